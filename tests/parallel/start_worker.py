"""torchrun worker (4 gloo ranks) shared by tests/parallel/test_plan.py and test_sharded_init.py:
one launch instead of four (a 4-rank launch costs ~10 s of imports on 2 cores), in this order:

1. plan_worker.measure_layouts: peak memory per layout for the planner, first, in a fresh process;
2. memory_worker.memory_runs: the model over the per-rank budget, one process (rank 0) and FSDP2;
3. init_worker.check_layouts: sharded start = single-process start, every family and layout.

The launch fixes glibc's mmap threshold at 16 KiB (MALLOC_MMAP_THRESHOLD_, see the test files):
RSS then follows live tensors, and each phase resets the peak (/proc/self/clear_refs) and hands
freed heap pages back (malloc_trim) before it measures.

argv: BUDGET_MB OUT_JSON. Rank 0 writes {"plan": [...], "memory": {"one": report, "four": [...]},
"init": [...], "seconds": {phase: rank 0's seconds}}.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

from fsdp_cases import worker_main
from init_worker import check_layouts
from memory_worker import memory_runs
from plan_worker import measure_layouts
from titanforge.trainer.dist import DistInfo


def _gather(obj, world: int) -> list:
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def main() -> None:
    budget_mb, out = float(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    seconds, t0 = {}, time.perf_counter()
    plan = _gather(measure_layouts(info, world), world)
    seconds["plan"], t0 = time.perf_counter() - t0, time.perf_counter()
    memory = _gather(memory_runs(info, world, budget_mb), world)
    seconds["memory"], t0 = time.perf_counter() - t0, time.perf_counter()
    init = _gather(check_layouts(info, world), world)
    seconds["init"] = time.perf_counter() - t0
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"plan": [r for part in plan for r in part],
                       "memory": {"one": memory[0]["one"], "four": [m["four"] for m in memory]},
                       "init": [r for part in init for r in part], "seconds": seconds}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(main)
