"""torchrun worker (4 gloo ranks): the trainer's sharded start equals the single-process start.

For every family and variant and each layout below, the trainer's step object is built (meta
model -> layout -> each rank allocates and initialises its shards, parallel/init.py; under pp the
stages are still cut from a full model per rank, see trainer/pipeline_step.py), and every
parameter and buffer it holds, made full, must equal `build_plain_model`'s (one process, the same
seed) exactly. Under pp a rank holds only its stages; the names held are gathered to check that
the stages together cover the whole model.

argv: OUT_JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
import torch.distributed as dist

from fsdp_cases import FAMILIES, VARIANTS, tiny_config, worker_main
from titanforge.launch.config import JobConfig
from titanforge.parallel import ParallelDims, build_mesh
from titanforge.parallel.config import ParallelConfig
from titanforge.parallel.init import model_tensors
from titanforge.trainer.config import TrainConfig
from titanforge.trainer.dist import DistInfo
from titanforge.trainer.step import build_plain_model, build_train_step

# (name, parallel config, families) on 4 ranks; ep only where there are experts.
LAYOUTS = [
    ("fsdp", dict(dp_backend="fsdp"), None),
    ("tp", dict(tp=2, dp_backend="fsdp"), None),
    ("pp", dict(pp=2, tp=2, dp_backend="fsdp"), None),
    ("pp_ddp", dict(pp=2, dp_backend="ddp"), ("llama",)),
    ("ep", dict(ep=2, dp_backend="fsdp"), ("jamba",)),
    ("ep_ddp", dict(ep=4, dp_backend="ddp"), ("jamba",)),
]


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    results = []
    for layout, pcfg, only in LAYOUTS:
        for name in FAMILIES + VARIANTS:
            if only is not None and name not in only:
                continue
            # Even vocabulary and kv heads so tp=2 fits every family.
            cfg = dataclasses.replace(tiny_config(name), vocab_size=98, n_kv_heads=2)
            job = JobConfig(model=cfg, parallel=ParallelConfig(**pcfg),
                            train=TrainConfig(seed=7, global_batch_size=8, micro_batch_size=2))
            dims = ParallelDims.from_config(job.parallel, world)
            mesh = build_mesh(dims, "cpu")
            step = build_train_step(job, dims, mesh, info)
            ref = model_tensors(build_plain_model(job, torch.device("cpu")))
            held = {}
            for part in getattr(step, "modules", [step.model]):  # pipeline: each local stage module
                held.update(model_tensors(part))
            worst, mismatched = 0.0, []
            for key, t in held.items():
                full = t.full_tensor() if hasattr(t, "full_tensor") else t
                if key not in ref or full.shape != ref[key].shape:
                    mismatched.append(key)
                    continue
                err = (full.double() - ref[key].double()).abs().max().item() if full.numel() else 0.0
                if err > 0:
                    mismatched.append(key)
                worst = max(worst, err)
            names = [None] * world
            dist.all_gather_object(names, sorted(held))
            covered = set().union(*names)
            results.append({"layout": layout, "model": name, "rank": rank, "max_abs_err": worst,
                            "mismatched": mismatched[:5], "uncovered": sorted(set(ref) - covered)[:5],
                            "n_tensors": len(ref), "n_held": len(held)})
            del step
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump([r for part in gathered for r in part], f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(main)
