"""Part of start_worker.py's 4-rank launch: measured peak memory per rank of real training steps,
per layout, for the planner's check (tests/parallel/test_plan.py). It runs first, in a fresh process.

For each family and layout: the trainer's step object is built (sharded start) and trains 2
AdamW steps; the peak is VmHWM (reset with /proc/self/clear_refs before the build) minus the RSS
at that moment, so it counts what this layout allocated: weights, gradients, optimizer state,
buffers, activations. A tiny warm-up run of each family comes first, so code paged in by the
first forward/backward is not charged to the first layout. The run's MALLOC_MMAP_THRESHOLD_ keeps
freed blocks from staying in the heap (see tests/parallel/test_sharded_init.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc

import torch
import torch.distributed as dist

from titanforge.launch.config import JobConfig
from titanforge.models.common.moe import MoEConfig
from titanforge.models.config import ModelConfig
from titanforge.models.jamba.config import JambaConfig
from titanforge.parallel import ParallelDims, build_mesh
from titanforge.parallel.config import ParallelConfig
from titanforge.trainer.config import TrainConfig
from titanforge.trainer.step import build_train_step

SEQ, MICRO, GLOBAL = 64, 2, 8
# (name, parallel config) per family on 4 ranks; the planner's Layout for each is in test_plan.py.
PLAN_CHECK_LAYOUTS = {
    "llama": [("fsdp", dict(dp_backend="fsdp")), ("tp2_fsdp", dict(tp=2, dp_backend="fsdp")),
              ("pp2_fsdp", dict(pp=2, dp_backend="fsdp"))],
    "jamba": [("fsdp", dict(dp_backend="fsdp")), ("ddp", dict(dp_backend="ddp")),
              ("ep2_fsdp", dict(ep=2, dp_backend="fsdp"))],
}


def plan_check_model(family: str) -> ModelConfig:
    """~17M (Llama) / ~20M (Jamba) parameters: weights, gradients and AdamW state dominate."""
    common = dict(vocab_size=8192, d_model=256, n_heads=4, n_kv_heads=2, max_seq_len=SEQ, tie_embeddings=False)
    if family == "llama":
        return ModelConfig(family="llama", n_layers=12, ffn_hidden=1024, **common)
    moe = MoEConfig(n_experts=4, top_k=2)
    return ModelConfig(family="jamba", n_layers=8, ffn_hidden=512, **common,
                       jamba=JambaConfig(layer_pattern="MD ME MD ME AD ME MD ME", d_state=16, chunk_size=16, moe=moe))


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def run(cfg, pcfg: dict, info, world: int) -> float:
    job = JobConfig(model=cfg, parallel=ParallelConfig(**pcfg),
                    train=TrainConfig(seed=1, global_batch_size=GLOBAL, micro_batch_size=MICRO))
    dims = ParallelDims.from_config(job.parallel, world)
    mesh = build_mesh(dims, "cpu")
    g = torch.Generator().manual_seed(info.rank)
    n_micro = GLOBAL // (MICRO * dims.dp)
    batches = [torch.randint(0, cfg.vocab_size, (MICRO, SEQ + 1), generator=g) for _ in range(n_micro)]
    gc.collect()
    # Hand the heap's free pages back first: otherwise what the previous layout freed is still in
    # RSS and is reused without raising VmHWM (Jamba, measured after Llama, read ~25 MiB low).
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _kb("VmRSS")
    step = build_train_step(job, dims, mesh, info)
    # Two steps: the second forward/backward runs with AdamW's state allocated (the steady state;
    # one step's peak is 20-35% lower under FSDP2).
    for _ in range(2):
        step.forward_backward(batches)
        step.clip_grad_norm(1.0)
        step.optimizer_step()
        step.zero_grad()
    peak = (_kb("VmHWM") - rss0) * 1024
    del step
    gc.collect()
    dist.barrier()
    return peak


def measure_layouts(info, world: int) -> list[dict]:
    """This rank's peak per family and layout (a warm-up run of each family first)."""
    results = []
    for family, layouts in PLAN_CHECK_LAYOUTS.items():
        cfg = plan_check_model(family)
        tiny = dataclasses.replace(cfg, n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, ffn_hidden=64, vocab_size=128)
        run(tiny, {"dp_backend": "fsdp"}, info, world)
        for name, pcfg in layouts:
            results.append({"family": family, "layout": name, "rank": info.rank, "peak": run(cfg, pcfg, info, world)})
    return results
