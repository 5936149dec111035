"""Worker for test_context_parallel.py: `torchrun --nproc-per-node 4 cp_worker.py OUT_DIR [case ...]`.

One launch runs every family under three layouts of the trainer's own `parallelize`: cp=4,
cp=2 x dp=2 (DDP over the four replicas) and cp=2 x tp=2 (tensor + sequence parallel inside,
FSDP2 over the cp ranks), full attention with its default zig-zag split; then Llama and Jamba
with the contiguous split at cp=4 and cp=2 x dp=2, and activation checkpointing at cp=4 (every
family) and cp=2 x dp=2 (Llama, Jamba). Each case builds a float64 model per rank with the same seed and keeps a
single-process copy; the sharded copy takes its data-parallel micro-batch and its piece of the
sequence. Compared: the global loss, every parameter's gradient, and the losses of STEPS AdamW
steps. Under cp=4 every rank also records the states it receives in forward, and they are
compared with the states the single-process model hands over at the same position (its final
states on the prefix before this rank's piece, taken by the same exchange code with a recorder
in place of the neighbour). Jamba's MoE load-balancing loss is off: it is a product of means over
the tokens a rank holds, so it is per piece (as it is per data-parallel micro-batch).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree

from titanforge.models.registry import build_model, collect_aux_losses
from titanforge.parallel import ParallelDims, build_mesh, parallelize
from titanforge.parallel.config import ParallelConfig
from titanforge.parallel.context import ContextGroup, apply_context_parallel, context_group, shard_sequence
from titanforge.parallel.tensor_parallel import tp_cross_entropy

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_cases as cases  # noqa: E402
from tp_worker import tiny  # noqa: E402

STEPS = 3
T = 64
MICRO = 2


def titans(variant: str) -> object:
    # MAG/MAL: the persistent tokens also enter the memory, so under cp their count is a multiple
    # of the chunk size (check_context).
    return tiny("titans", 2, **{"titans.variant": variant, "titans.chunk_size": 8, "titans.segment_len": 16,
                                "titans.window": 12, "titans.n_persistent": 8 if variant in ("mag", "mal") else 2})


CASES = {
    "llama": lambda: tiny("llama", n_kv_heads=2),
    "titans_mac": lambda: titans("mac"),
    "titans_mag": lambda: titans("mag"),
    "titans_mal": lambda: titans("mal"),
    "titans_lmm": lambda: titans("lmm"),
    "ttt_linear": lambda: tiny("ttt", **{"ttt.inner": "linear", "ttt.backbone": "mamba", "ttt.mini_batch_size": 8}),
    "ttt_mlp": lambda: tiny("ttt", **{"ttt.inner": "mlp", "ttt.backbone": "transformer", "ttt.mini_batch_size": 8,
                                      "ttt.mlp_expansion": 2}),
    "jamba": lambda: tiny("jamba", 3, n_kv_heads=2, **{"jamba.layer_pattern": "MD AE SD", "jamba.d_state": 8,
                                                    "jamba.moe.n_experts": 4, "jamba.moe.top_k": 2,
                                                    "jamba.moe.expert_hidden": 32, "jamba.moe.load_balance_coef": 0.0,
                                                    "jamba.mamba2_headdim": 16}),
}
# name -> (config, activation checkpointing, the cases it runs (None: all)). Full attention uses the
# default zig-zag split except in the *_contiguous layouts; *_ckpt recomputes every block in backward.
ATTENTION = ("llama", "jamba")
LAYOUTS = {"cp4": (ParallelConfig(cp=4), False, None), "cp2_dp2": (ParallelConfig(cp=2, dp=2), False, None),
           "cp2_tp2": (ParallelConfig(cp=2, tp=2, dp_backend="fsdp"), False, None),
           "cp4_contiguous": (ParallelConfig(cp=4, cp_split="contiguous"), False, ATTENTION),
           "cp2_dp2_contiguous": (ParallelConfig(cp=2, dp=2, cp_split="contiguous"), False, ATTENTION),
           "cp4_ckpt": (ParallelConfig(cp=4), True, None),
           "cp2_dp2_ckpt": (ParallelConfig(cp=2, dp=2), True, ATTENTION)}


def loss_of(model, tokens, tp_mesh=None):
    logits = model(tokens[:, :-1])
    loss = tp_cross_entropy(logits, tokens[:, 1:], tp_mesh) if tp_mesh is not None else \
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    aux = collect_aux_losses(model.module if hasattr(model, "module") else model)
    return loss + sum(aux.values()) if aux else loss


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class Recorder(ContextGroup):
    """A stand-in neighbour for one process: keeps every state the model would send on."""

    def __init__(self):
        self.rank, self.size, self.prev, self.next = 0, 1, None, None
        self._site, self.record, self.bytes_sent = 0, None, 0
        self.nccl, self.sent = False, []

    def send(self, tag, carrier, state):
        self.sent.append(pytree.tree_map(lambda t: t.detach().clone(), state))
        return carrier


def crossing_errors(ref, cfg, tokens, received, cp_rank, n) -> dict:
    """Max relative difference between the received states and the single-process states at
    position cp_rank * n (the prefix model's hand-off states), per exchange site."""
    if cp_rank == 0:
        return {"sites": 0, "max_rel": 0.0}
    prefix = build_model(cfg).double()
    prefix.load_state_dict(ref.state_dict())
    rec = Recorder()
    apply_context_parallel(prefix, cfg.family, rec)
    with torch.no_grad():
        prefix(tokens[:, :cp_rank * n])
    assert len(rec.sent) == len(received), (len(rec.sent), len(received))
    worst = 0.0
    for want, got in zip(rec.sent, received):
        wl, gl = pytree.tree_leaves(want), pytree.tree_leaves(got)
        assert len(wl) == len(gl)
        for w, g in zip(wl, gl):
            worst = max(worst, rel(g, w))
    return {"sites": len(received), "max_rel": worst}


def run_case(name: str, layout: dict) -> dict:
    cfg = CASES[name]()
    dims, pmesh, pcfg = layout["dims"], layout["mesh"], layout["cfg"]
    if name == "jamba" and dims.tp > 1:
        # Tensor parallelism does not shard Mamba-2 layers (check_tp): Mamba-1 and attention only.
        cfg.n_layers, cfg.jamba.layer_pattern = 2, "MD AE"
    torch.manual_seed(0)
    ref = build_model(cfg).double()
    model = parallelize(copy.deepcopy(ref), cfg.family, dims, pmesh, pcfg, torch.device("cpu"),
                        activation_checkpointing=layout["ckpt"])
    raw = model.module if hasattr(model, "module") else model
    cg = context_group(raw)
    tp_mesh = pmesh["tp"] if dims.tp > 1 else None
    dp, dp_rank = dims.dp, pmesh["dp"].get_local_rank()
    cp_rank = pmesh["cp"].get_local_rank()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (MICRO * dp, T + 1), generator=g) for _ in range(STEPS + 1)]
    local = [shard_sequence(b.chunk(dp)[dp_rank], cp_rank, dims.cp) for b in batches]
    res = {}
    ref_loss = sum(loss_of(ref, c) for c in batches[0].chunk(dp)) / dp
    if layout["record"]:
        cg.record = []
    loss = loss_of(model, local[0], tp_mesh)
    # Score elements the blockwise attention computed in this rank's first forward (balance test).
    res["attention_scores"] = cg.attention_scores
    if layout["record"]:
        res["crossing"] = crossing_errors(ref, cfg, batches[0].chunk(dp)[dp_rank], cg.record, cp_rank,
                                          T // dims.cp)
        cg.record = None
    ref_loss.backward()
    loss.backward()

    def global_mean(t):
        t = t.detach().clone()
        dist.all_reduce(t)
        return float(t) / dist.get_world_size()

    res["loss"], res["ref_loss"] = global_mean(loss), float(ref_loss)
    params = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in raw.named_parameters()}
    grads = {}
    for pname, p in ref.named_parameters():
        q = params.get(pname)
        if q is None or q.grad is None:
            grads[pname] = "missing"
            continue
        gq = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
        grads[pname] = rel(gq, p.grad)
    res["grad_rel"] = grads
    res["bytes_sent"] = cg.bytes_sent
    res["replayed"] = cg.replayed
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt_ref.step()
    opt.step()
    res["losses"], res["ref_losses"] = [], []
    for tokens, mine in zip(batches[1:], local[1:]):
        opt_ref.zero_grad()
        lo = sum(loss_of(ref, c) for c in tokens.chunk(dp)) / dp
        lo.backward()
        opt_ref.step()
        res["ref_losses"].append(float(lo))
        opt.zero_grad()
        lo = loss_of(model, mine, tp_mesh)
        lo.backward()
        opt.step()
        res["losses"].append(global_mean(lo))
    return res


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2:] or list(CASES)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    results = {}
    for lname, (pcfg, ckpt, only) in LAYOUTS.items():
        dims = ParallelDims.from_config(pcfg, world)
        layout = {"dims": dims, "mesh": build_mesh(dims, "cpu"), "cfg": pcfg, "record": lname == "cp4", "ckpt": ckpt}
        for name in names:
            if only is not None and name not in only:
                continue
            cases.record(results, f"{lname}/{name}", run_case, name, layout)
    cases.write_results(out_dir, results)


if __name__ == "__main__":
    cases.worker_main(main)
