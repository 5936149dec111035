"""Worker: start and train a Llama whose float32 weights exceed a per-rank memory budget.

The budget is enforced, not only measured: after imports and the process group, RLIMIT_DATA (all
private writable memory: heap, mmap'd tensors) is set to what the process holds now plus
BUDGET_MB, so an allocation past it fails. The trainer's step object is built (meta model ->
FSDP2 -> each rank allocates and initialises its shards, parallel/init.py) and trained 2 steps
with plain SGD (no optimizer state: float32 AdamW state alone is twice the weights, and on 4
ranks a quarter of weights + gradients + AdamW state is the whole model's size again).

On 4 ranks (FSDP2, dp=4) every rank must fit; on one rank the same model must fail to start. Reports JSON to argv[2]: per rank the weights' size, the measured
peak (ru_maxrss - RSS before the build), the losses, or the error and where it happened.

argv: BUDGET_MB OUT_JSON.
"""

from __future__ import annotations

import json
import resource
import sys

import torch
import torch.distributed as dist

from fsdp_cases import worker_main
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


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    budget_mb, out = float(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    job = JobConfig(model=MODEL, parallel=ParallelConfig(dp_backend="fsdp"),
                    train=TrainConfig(seed=3, global_batch_size=MICRO * world, micro_batch_size=MICRO))
    dims = ParallelDims.from_config(job.parallel, world)
    mesh = build_mesh(dims, "cpu")
    # The first build imports the model code (~100 MB of RSS): before the baseline, not in the peak.
    weights_mb = sum(p.numel() for p in build_model(MODEL, device="meta").parameters()) * 4 / 2**20
    tokens = torch.randint(0, MODEL.vocab_size, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(rank))
    rss0 = _status_kb("VmRSS")
    limit = (_status_kb("VmData") + int(budget_mb * 1024)) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
    report = {"rank": rank, "world": world, "budget_mb": budget_mb, "weights_mb": weights_mb, "stage": "start"}
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
    except (RuntimeError, MemoryError) as e:
        report["error"] = str(e).splitlines()[0][:300]
    resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    report["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(reports, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(main)
