"""Worker for test_tensor_parallel.py, run as `torchrun --nproc-per-node N tp_worker.py OUT_DIR [case ...]`.

Every case builds one float64 model per rank with the same seed and keeps a single-process copy.
With 2 ranks the other copy is sharded with `apply_tensor_parallel` on a 2-rank "tp" mesh; with 4
ranks it goes through the trainer's own `parallelize` on a dp=2 x tp=2 layout (tensor + sequence
parallel inside, FSDP2 over dp), each dp rank taking its half of the global batch. The test
compares the loss, every parameter's gradient (DTensor grads gathered with full_tensor) and the
losses of STEPS AdamW steps. The single-process reference takes the same global batch as dp
micro-batches and averages their losses, as the trainer's gradient accumulation does (the MoE
load-balancing loss is per micro-batch, so this is the comparable quantity). Each rank writes its
results to OUT_DIR/rank<r>.json; the test asserts on them, so one launch covers every family.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from titanforge.models.config import ModelConfig
from titanforge.models.registry import build_model, collect_aux_losses
from titanforge.models.svf import apply_svf
from titanforge.parallel import ParallelDims, build_mesh, parallelize
from titanforge.parallel.config import ParallelConfig
from titanforge.parallel.tensor_parallel import apply_tensor_parallel, tp_cross_entropy
from titanforge.parallel.tp_loss import vocab_parallel_cross_entropy

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_cases as cases  # noqa: E402

STEPS = 5
T = 32
MICRO = 2  # sequences per data-parallel rank


def tiny(family: str, n_layers: int = 2, **kw) -> ModelConfig:
    """A tiny config of `family`; dotted keys set nested fields (e.g. "titans.chunk_size")."""
    cfg = ModelConfig(family=family, vocab_size=96, d_model=32, n_layers=n_layers, n_heads=4, ffn_hidden=48,
                      max_seq_len=64, **{k: v for k, v in kw.items() if "." not in k})
    for key, val in kw.items():
        if "." in key:
            obj = cfg
            *path, leaf = key.split(".")
            for part in path:
                obj = getattr(obj, part)
            setattr(obj, leaf, val)
    return cfg


def titans(variant: str, n_layers: int = 2) -> ModelConfig:
    return tiny("titans", n_layers, **{"titans.variant": variant, "titans.chunk_size": 8, "titans.segment_len": 16,
                             "titans.window": 16, "titans.n_persistent": 2})


CASES = {
    "llama": lambda: tiny("llama", n_kv_heads=2),
    "llama_untied_nosp": lambda: tiny("llama", tie_embeddings=False),
    "titans_mac": lambda: titans("mac"),
    "titans_mag": lambda: titans("mag"),
    "titans_mal": lambda: titans("mal"),
    "titans_lmm": lambda: titans("lmm"),
    "ttt_linear": lambda: tiny("ttt", **{"ttt.inner": "linear", "ttt.backbone": "mamba", "ttt.mini_batch_size": 8}),
    "ttt_mlp": lambda: tiny("ttt", **{"ttt.inner": "mlp", "ttt.backbone": "transformer", "ttt.mini_batch_size": 8,
                                      "ttt.mlp_expansion": 2}),
    "jamba": lambda: tiny("jamba", n_kv_heads=2, **{"jamba.layer_pattern": "MD AE", "jamba.d_state": 8,
                                                    "jamba.moe.n_experts": 4, "jamba.moe.top_k": 2,
                                                    "jamba.moe.expert_hidden": 32, "jamba.moe.z_loss_coef": 1e-3}),
}
# The same models in their SVF form (Transformer², models/svf.py): only the z-vectors train; U / V^T
# are split the way the weight they replace is.
CASES.update({f"svf_{k}": CASES[k] for k in ("llama", "titans_mac", "ttt_linear", "jamba")})
# Cases that run without sequence parallelism and gather the logits.
NO_SP = {"llama_untied_nosp"}


def loss_of(model, tokens, mesh=None):
    logits = model(tokens[:, :-1])
    loss = tp_cross_entropy(logits, tokens[:, 1:], mesh) if mesh is not None else \
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    aux = collect_aux_losses(model)
    return loss + sum(aux.values()) if aux else loss


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def local_heads(model, cfg) -> dict:
    """Heads held by this rank in each memory tensor (Titans memory MLP, TTT inner weights)."""
    out = {}
    for i, block in model.layers.items():
        if cfg.family == "titans":
            for j, w in enumerate(block.memory.memory):
                out[f"layers.{i}.memory.memory.{j}"] = w.to_local().shape[0]
        elif cfg.family == "ttt":
            out[f"layers.{i}.ttt.W1"] = block.ttt.W1.to_local().shape[0]
    return out


def _mean_loss(model, tokens, dp: int, mesh=None):
    """Mean of the dp micro-batches' losses (one process) or this rank's micro-batch loss."""
    if mesh is None:
        return sum(loss_of(model, chunk) for chunk in tokens.chunk(dp)) / dp
    return loss_of(model, tokens, mesh)


def _global(loss: torch.Tensor, dp_group) -> float:
    """The global mean loss from each data-parallel rank's micro-batch loss."""
    t = loss.detach().clone()
    if dp_group is not None:
        dist.all_reduce(t, group=dp_group)
        t /= dist.get_world_size(dp_group)
    return float(t)


def run_case(name: str, layout) -> dict:
    cfg = CASES[name]()
    sp = name not in NO_SP
    torch.manual_seed(0)
    ref = build_model(cfg).double()
    if name.startswith("svf_"):
        apply_svf(ref)
    tp_mesh, dp, dp_rank, dp_group = layout["tp"], layout["dp"], layout["dp_rank"], layout["dp_group"]
    if dp == 1:
        model = apply_tensor_parallel(copy.deepcopy(ref), tp_mesh, cfg.family, sequence_parallel=sp,
                                      loss_parallel=sp)
    else:
        model = parallelize(copy.deepcopy(ref), cfg.family, layout["dims"], layout["mesh"], layout["cfg"],
                            torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (MICRO * dp, T + 1), generator=g) for _ in range(STEPS + 1)]
    local = [b.chunk(dp)[dp_rank] for b in batches]
    res = {"plain_params": [n for n, p in model.named_parameters() if not isinstance(p, DTensor)],
           "heads": local_heads(model, cfg) if dp == 1 else {}, "n_heads": cfg.n_heads}
    ref_loss = _mean_loss(ref, batches[0], dp)
    loss = _mean_loss(model, local[0], dp, tp_mesh)
    ref_loss.backward()
    loss.backward()
    res["loss"], res["ref_loss"] = _global(loss, dp_group), float(ref_loss)
    tp_params = dict(model.named_parameters())
    grads = {}
    for pname, p in ref.named_parameters():
        q = tp_params[pname]
        if not p.requires_grad:
            # Frozen (SVF): must stay frozen and without a gradient.
            grads[pname] = 0.0 if (not q.requires_grad and q.grad is None) else "trained"
            continue
        if q.grad is None:
            grads[pname] = "missing"
            continue
        gq = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
        grads[pname] = rel(gq, p.grad)
    res["grad_rel"] = grads
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt_ref.step()
    opt.step()
    res["losses"], res["ref_losses"] = [], []
    for tokens, mine in zip(batches[1:], local[1:]):
        for o, m, mesh_ in ((opt_ref, ref, None), (opt, model, tp_mesh)):
            o.zero_grad()
            lo = _mean_loss(m, tokens if mesh_ is None else mine, dp, mesh_)
            lo.backward()
            o.step()
            if mesh_ is None:
                res["ref_losses"].append(float(lo))
            else:
                res["losses"].append(_global(lo, dp_group))
    return res


def _shard(ref, cfg, layout):
    if layout["dp"] == 1:
        return apply_tensor_parallel(ref, layout["tp"], cfg.family, sequence_parallel=True, loss_parallel=True)
    return parallelize(ref, cfg.family, layout["dims"], layout["mesh"], layout["cfg"], torch.device("cpu"))


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def checkpoint_case(layout, root: str) -> dict:
    """Jamba (Mamba's strided in_proj included) saved by the trainer's Checkpointer under this layout,
    loaded into a plain full model and into a freshly initialised model of the same layout:
    weights and AdamW moments must come back exactly."""
    from titanforge.trainer.checkpoint import Checkpointer
    from titanforge.trainer.config import CheckpointConfig
    from titanforge.trainer.dist import DistInfo

    cfg = CASES["jamba"]()
    torch.manual_seed(0)
    model = _shard(build_model(cfg).double(), cfg, layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, cfg.vocab_size, (MICRO * layout["dp"], T + 1),
                           generator=torch.Generator().manual_seed(3)).chunk(layout["dp"])[layout["dp_rank"]]
    loss_of(model, tokens, layout["tp"]).backward()
    opt.step()
    rank, world = dist.get_rank(), dist.get_world_size()
    ck = Checkpointer(root, CheckpointConfig(), DistInfo(rank, world, rank, torch.device("cpu")))
    ck.save(1, model, opt, {"rank": rank}, {}, "")
    names = [n for n, _ in model.named_parameters()]
    saved = {n: _full(p.detach()) for n, p in model.named_parameters()}
    saved_m = {n: _full(opt.state[p]["exp_avg"]) for n, p in model.named_parameters()}
    res = {}
    for kind in ("plain", "same_layout"):
        torch.manual_seed(11)
        other = build_model(cfg).double()
        if kind == "same_layout":
            other = _shard(other, cfg, layout)
        oopt = torch.optim.AdamW(other.parameters(), lr=1e-2)
        ck.load(Path(root) / "step_00000001", other, oopt)
        params = dict(other.named_parameters())
        res[kind] = {"missing": sorted(set(names) - set(params)),
                     "weights": max(rel(_full(params[n].detach()), saved[n]) for n in names),
                     "exp_avg": max(rel(_full(oopt.state[params[n]]["exp_avg"]), saved_m[n]) for n in names)}
    return res


def vocab_ce_case(mesh) -> dict:
    """vocab_parallel_cross_entropy against F.cross_entropy, ignore_index included, with grads."""
    torch.manual_seed(2)
    V, N = 10, 7
    z = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[3] = -100
    ref = F.cross_entropy(z, t, ignore_index=-100)
    ref.backward()
    r = mesh.get_local_rank()
    z_local = z.detach()[:, r * V // 2:(r + 1) * V // 2].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(z_local, t, r * V // 2, mesh.get_group())
    loss.backward()
    return {"loss": float(loss), "ref_loss": float(ref),
            "grad_rel": {"logits": rel(z_local.grad, z.grad[:, r * V // 2:(r + 1) * V // 2])}}


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2:] or list(CASES)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    if world == 2:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        layout = {"tp": mesh, "dp": 1, "dp_rank": 0, "dp_group": None}
        extra = ["vocab_ce", "checkpoint"]
    elif world == 4:
        cfg = ParallelConfig(tp=2, dp_backend="fsdp")
        dims = ParallelDims.from_config(cfg, world)
        pmesh = build_mesh(dims, "cpu")
        mesh = pmesh["tp"]
        layout = {"tp": mesh, "dp": dims.dp, "dp_rank": pmesh["dp"].get_local_rank(),
                  "dp_group": pmesh["dp"].get_group(), "dims": dims, "mesh": pmesh, "cfg": cfg}
        extra = ["checkpoint"]
    else:
        raise SystemExit(f"tp_worker.py runs on 2 ranks (tp=2) or 4 ranks (dp=2 x tp=2), not {world}")
    results = {}
    for name in names + extra:
        if name == "vocab_ce":
            cases.record(results, name, vocab_ce_case, mesh)
        elif name == "checkpoint":
            cases.record(results, name, checkpoint_case, layout, os.path.join(out_dir, "ckpt"))
        else:
            cases.record(results, name, run_case, name, layout)
    cases.write_results(out_dir, results)


if __name__ == "__main__":
    cases.worker_main(main)
