"""Worker for test_pipeline.py, run as `torchrun --nproc-per-node N pp_worker.py OUT_DIR [case ...]`.

Each case builds the trainer's own `PipelineTrainStep` (float64, 4 layers, pp=2) and, in the same
process, the single-process reference: the same initial weights (same seed through
`build_plain_model`) and the same global batch taken as the same micro-batches, each micro-batch's
loss (cross-entropy + MoE aux losses) divided by their number and backpropagated, as the plain
step's accumulation does. Recorded per rank: the step's global loss, the relative error of every
gradient this rank holds (DTensors gathered with full_tensor), the gradient norm, the per-module
metrics rank 0 logs, and STEPS AdamW steps' losses (clipped at a norm below the gradients', so
the clipping path runs), and the parameters after the steps as saved by DCP from the stages and
loaded into a plain full model. Layouts: 2 ranks run pp=2; 4 ranks run pp=2 x dp=2 (FSDP2 or DDP-style
averaging) and pp=2 x tp=2. Each rank writes OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

from titanforge.models.common.moe import MoE, pooled_load_balance
from titanforge.models.config import ModelConfig
from titanforge.models.registry import build_model, collect_aux_losses, collect_metrics
from titanforge.parallel import ParallelDims, build_mesh
from titanforge.parallel.config import ParallelConfig
from titanforge.parallel.pipeline import split_layers
from titanforge.parallel.tp_loss import tp_cross_entropy
from titanforge.trainer.checkpoint import dcp_storable
from titanforge.trainer.config import OptimConfig, TrainConfig
from titanforge.trainer.dist import DistInfo
from titanforge.trainer.optim import build_optimizer
from titanforge.trainer.pipeline_step import PipelineTrainStep
from titanforge.trainer.step import build_plain_model

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_cases as cases  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import tp_worker  # noqa: E402  (the tiny per-family configs)

STEPS = 5
T = 32
GLOBAL, MICRO = 4, 1
CLIP = 0.5


def tiny(family: str, **kw) -> ModelConfig:
    return tp_worker.tiny(family, n_layers=4, **kw)


def titans(variant: str) -> ModelConfig:
    return tp_worker.titans(variant, n_layers=4)


MODELS = {
    "llama": lambda: tiny("llama", n_kv_heads=2, tie_embeddings=False),
    "llama_tied": lambda: tiny("llama", n_kv_heads=2, tie_embeddings=True),
    "titans_mac": lambda: titans("mac"),
    "titans_mag": lambda: titans("mag"),
    "titans_mal": lambda: titans("mal"),
    "titans_lmm": lambda: titans("lmm"),
    "ttt_linear": lambda: tiny("ttt", **{"ttt.inner": "linear", "ttt.backbone": "mamba", "ttt.mini_batch_size": 8}),
    "ttt_mlp": lambda: tiny("ttt", **{"ttt.inner": "mlp", "ttt.backbone": "transformer", "ttt.mini_batch_size": 8,
                                      "ttt.mlp_expansion": 2}),
    "jamba": lambda: tiny("jamba", n_kv_heads=2, **{"jamba.layer_pattern": "MD AE", "jamba.d_state": 8,
                                                    "jamba.chunk_size": 16, "jamba.moe.n_experts": 4,
                                                    "jamba.moe.top_k": 2, "jamba.moe.expert_hidden": 32,
                                                    "jamba.moe.load_balance_coef": 1e-2,
                                                    "jamba.moe.z_loss_coef": 1e-3}),
}

# case -> (model, parallel config); the world size picks which cases a launch runs.
CASES_2 = {
    **{f"{m}_1f1b": (m, dict(pp=2)) for m in MODELS if m != "llama_tied"},
    "llama_interleaved": ("llama", dict(pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=2)),
    "jamba_interleaved": ("jamba", dict(pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=2)),
    "llama_gpipe": ("llama", dict(pp=2, pp_schedule="gpipe")),
}
CASES_4 = {
    "llama_dp_fsdp": ("llama", dict(pp=2, dp_backend="fsdp")),
    "jamba_dp_fsdp": ("jamba", dict(pp=2, dp_backend="fsdp")),
    "llama_tied_dp_ddp": ("llama_tied", dict(pp=2, dp_backend="ddp")),
    "llama_tp": ("llama", dict(pp=2, tp=2)),
    "jamba_tp": ("jamba", dict(pp=2, tp=2)),
}
# 3-D: pp=2 x dp=2 (FSDP2) x tp=2 on 8 ranks.
CASES_8 = {
    "llama_3d": ("llama", dict(pp=2, tp=2, dp_backend="fsdp")),
    "jamba_3d": ("jamba", dict(pp=2, tp=2, dp_backend="fsdp")),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def stage_aux_losses(model, n_stages: int) -> dict:
    """The aux losses as a pipeline of `n_stages` forms them: z-losses per layer, the balance loss
    pooled over each stage's MoE layers (parallel/pipeline.py; one term for the whole model when
    n_stages = 1)."""
    aux = {k: v for k, v in collect_aux_losses(model).items() if k != "load_balance"}
    for layers in split_layers(len(model.layers), n_stages):
        lb = pooled_load_balance(m for i in layers for m in model.layers[str(i)].modules() if isinstance(m, MoE))
        if lb is not None:
            aux[f"load_balance.{layers[0]}"] = lb
    return aux


def reference_step(model, micro_batches: list[torch.Tensor], n_stages: int) -> float:
    """Accumulated forward + backward of the micro-batches; returns the mean cross-entropy."""
    n, ce_sum = len(micro_batches), 0.0
    for tokens in micro_batches:
        ce = tp_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        aux = stage_aux_losses(model, n_stages)
        ((ce + sum(aux.values())) / n).backward()
        ce_sum += float(ce.detach())
    return ce_sum / n


def run_case(name: str, model_name: str, par: dict, world: int, out_dir: str) -> dict:
    cfg = MODELS[model_name]()
    pcfg = ParallelConfig(**par)
    dims = ParallelDims.from_config(pcfg, world)
    mesh = build_mesh(dims, "cpu")
    job = SimpleNamespace(model=cfg, parallel=pcfg, optim=OptimConfig(lr=1e-2, warmup_steps=0),
                          train=TrainConfig(global_batch_size=GLOBAL, micro_batch_size=MICRO, seed=0))
    info = DistInfo(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), device=torch.device("cpu"))
    step = PipelineTrainStep(job, dims, mesh, info)
    ref = build_plain_model(job, torch.device("cpu"))
    ref_opt = build_optimizer(ref, job.optim)
    dp_rank = mesh["dp"].get_local_rank()

    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (GLOBAL, T + 1), generator=g) for _ in range(STEPS)]
    res = {"dtypes": sorted({str(p.dtype) for p in step.model.parameters()}), "losses": [], "ref_losses": [],
           "norms": [], "ref_norms": []}
    for i, tokens in enumerate(batches):
        micro = list(tokens.split(MICRO))
        mine = list(tokens.chunk(dims.dp)[dp_rank].split(MICRO))
        ref_loss = reference_step(ref, micro, step.n_stages)
        loss = float(step.forward_backward(mine))
        if i == 0:
            res["loss"], res["ref_loss"] = loss, ref_loss
            ref_params = dict(ref.named_parameters())
            res["grad_rel"] = {n: (rel(full(p.grad), ref_params[n].grad) if p.grad is not None else "missing")
                               for n, p in step.model.named_parameters()}
            res["all_params"] = sorted(ref_params)
            res["metrics"] = {k: v for k, v in step.metrics().items() if isinstance(v, (int, float))}
            res["ref_metrics"] = {k: v for k, v in collect_metrics(ref).items() if isinstance(v, (int, float))}
        norm = float(step.clip_grad_norm(CLIP))
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP))
        step.optimizer_step()
        step.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
        res["losses"].append(loss)
        res["ref_losses"].append(ref_loss)
        res["norms"].append(norm)
        res["ref_norms"].append(ref_norm)
    # Validation through the forward-only path, on this dp rank's first micro-batch.
    val_tokens = batches[0].chunk(dims.dp)[dp_rank][:MICRO]
    step.train(False)
    val, count = step.val_loss(val_tokens)
    with torch.no_grad():
        res["ref_val"] = float(tp_cross_entropy(ref(val_tokens[:, :-1]), val_tokens[:, 1:]))
    res["val"], res["val_count"] = float(val), count
    res["ckpt_rel"] = checkpoint_round_trip(step, cfg, ref, f"{out_dir}/ckpt_{name}")
    return res


def checkpoint_round_trip(step, cfg, ref, path: str) -> dict:
    """DCP-save the step's model and optimizer as the Checkpointer does, load the model part into a
    plain full model on every rank; relative error of each parameter against the reference's."""
    msd, osd = get_state_dict(step.model, step.optimizer)
    # As the Checkpointer stores them (Jamba's TP-strided Mamba in_proj re-sharded for DCP).
    dcp.save(dcp_storable({"model": msd, "optimizer": osd}), checkpoint_id=path)
    torch.manual_seed(123)
    fresh = build_model(cfg)
    state = {"model": fresh.state_dict()}
    dcp.load(state, checkpoint_id=path)
    fresh.load_state_dict(state["model"])
    ref_params = dict(ref.named_parameters())
    return {n: rel(p.detach(), ref_params[n].detach()) for n, p in fresh.named_parameters()}


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    torch.set_default_dtype(torch.float64)
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = {2: CASES_2, 4: CASES_4, 8: CASES_8}[world]
    results = {}
    for name in names or list(cases):
        try:
            results[name] = run_case(name, *cases[name], world, out_dir)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    cases.worker_main(main)
