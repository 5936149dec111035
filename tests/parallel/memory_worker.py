"""Part of start_worker.py's 4-rank launch (tests/parallel/test_sharded_init.py): a Llama whose
float32 weights exceed a per-rank memory budget starts and trains under FSDP2 and cannot start in
one process.

The budget is enforced, not only measured: RLIMIT_DATA (all private writable memory: heap, mmap'd
tensors) is set to what the process holds at that moment plus BUDGET_MB, so an allocation past it
fails. In order:
1. rank 0 alone builds the step of a one-process run (dp=1, no mesh: the whole model is
   materialised) under the budget; it must fail to allocate at start. The other ranks wait. This
   is the single-process start's code path, run in this launch to save a second one.
2. every rank builds the trainer's step object (meta model -> FSDP2 -> each rank allocates and
   initialises its shards, parallel/init.py) under the budget and trains 2 steps with plain SGD
   (no optimizer state: float32 AdamW state alone is twice the weights, and on 4 ranks a quarter
   of weights + gradients + AdamW state is the whole model's size again). The peak is VmHWM
   (reset with /proc/self/clear_refs before the build) minus the RSS before the build.
A report holds the weights' size, the peak, the losses, or the error and where it happened.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import resource

import torch
import torch.distributed as dist

from titanforge.launch.config import JobConfig
from titanforge.models.config import ModelConfig
from titanforge.models.registry import build_model
from titanforge.parallel import ParallelDims, build_mesh
from titanforge.parallel.config import ParallelConfig
from titanforge.trainer.config import TrainConfig
from titanforge.trainer.dist import DistInfo
from titanforge.trainer.step import build_train_step

# ~77M parameters: 294 MB of float32 weights, in 32 blocks of 2.4M (9 MB) each.
MODEL = ModelConfig(family="llama", vocab_size=4096, d_model=384, n_layers=32, n_heads=8, n_kv_heads=8,
                    ffn_hidden=1536, max_seq_len=64, tie_embeddings=True)
SEQ, MICRO = 32, 1
# The budget per rank, MB over what the process holds before the model is built.
BUDGET_MB = 265


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> int:
    """Hand freed heap pages back, reset VmHWM to the current RSS; returns that RSS (KiB)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def _start_and_train(job, dims, mesh, info, tokens, budget_mb: float, weights_mb: float) -> dict:
    """Build the step under the budget and train 2 SGD steps; the report (stage reached, peak)."""
    rss0 = _reset_peak()
    limit = (_status_kb("VmData") + int(budget_mb * 1024)) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
    report = {"rank": info.rank, "world": info.world_size, "budget_mb": budget_mb, "weights_mb": weights_mb,
              "stage": "start"}
    try:
        step = build_train_step(job, dims, mesh, info)
        report["stage"] = "train"
        step.optimizer = torch.optim.SGD(step.model.parameters(), lr=1e-2)
        losses = []
        for _ in range(2):
            loss = step.forward_backward([tokens])
            step.clip_grad_norm(1.0)
            step.optimizer_step()
            step.zero_grad()
            losses.append(loss.item())
        report.update(stage="done", losses=losses)
        del step
    except (RuntimeError, MemoryError) as e:
        report["error"] = str(e).splitlines()[0][:300]
    resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    report["peak_mb"] = (_status_kb("VmHWM") - rss0) / 1024
    gc.collect()
    return report


def memory_runs(info, world: int, budget_mb: float) -> dict:
    """Steps 1 and 2 above: {"one": rank 0's one-process report (None elsewhere), "four": this rank's}."""
    rank = info.rank
    job = JobConfig(model=MODEL, parallel=ParallelConfig(dp_backend="fsdp"),
                    train=TrainConfig(seed=3, global_batch_size=MICRO * world, micro_batch_size=MICRO))
    dims = ParallelDims.from_config(job.parallel, world)
    mesh = build_mesh(dims, "cpu")
    # The first build imports the model code (~100 MB of RSS): before the baseline, not in the peak.
    weights_mb = sum(p.numel() for p in build_model(MODEL, device="meta").parameters()) * 4 / 2**20
    tokens = torch.randint(0, MODEL.vocab_size, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(rank))
    one = None
    if rank == 0:
        job1 = dataclasses.replace(job, train=dataclasses.replace(job.train, global_batch_size=MICRO))
        dims1 = ParallelDims.from_config(job1.parallel, 1)
        info1 = DistInfo(rank=0, world_size=1, local_rank=0, device=info.device)
        one = _start_and_train(job1, dims1, None, info1, tokens, budget_mb, weights_mb)
    dist.barrier()
    four = _start_and_train(job, dims, mesh, info, tokens, budget_mb, weights_mb)
    return {"one": one, "four": four}
