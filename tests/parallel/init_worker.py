"""Sharded start on 4 gloo ranks equals the single-process start (run by memory_worker.py's launch).

For every family and variant and each layout below, the trainer's step object is built (meta
model -> layout -> each rank allocates and initialises its shards, parallel/init.py; under pp each
rank cuts its stages from the meta model first), and every parameter and buffer it holds, made
full, must equal `build_plain_model`'s (one process, the same seed) exactly. Under pp a rank holds
only its stages; the names held are gathered to check that the stages together cover the model.

Also recorded per case:
- `allocated`: elements `materialize` allocated on this rank while the step was built, and
  `local`: elements of the tensors the rank holds (its shards: DTensors' local parts). Equal, and
  below the whole model's count: nothing but the rank's own shards was ever materialised (the old
  pipeline path, which built the whole model on every rank and cut stages from it, fails this).
- `bad_grad_placements` (tensor parallelism without data parallelism: pp x tp here): after one
  forward/backward, DTensor parameters whose gradient is not placed like the parameter. `finalize_grads` (parallel/tp_styles.py) redistributes tensor-parallel
  gradients with hooks on the parameters; allocating a meta model used to drop those hooks (the
  pipeline's tied-embedding all-reduce then aborted: parallel/init.py `to_empty_keeping_hooks`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import titanforge.parallel.init as sharded_init
from fsdp_cases import FAMILIES, VARIANTS, tiny_config
from titanforge.launch.config import JobConfig
from titanforge.parallel import ParallelDims, build_mesh
from titanforge.parallel.config import ParallelConfig
from titanforge.parallel.init import model_tensors
from titanforge.trainer.config import TrainConfig
from titanforge.trainer.step import build_plain_model, build_train_step

ALL = FAMILIES + VARIANTS
# (name, parallel config, families) on 4 ranks; ep only where there are experts.
LAYOUTS = [
    ("fsdp", dict(dp_backend="fsdp"), ALL),
    ("tp", dict(tp=2, dp_backend="fsdp"), ALL),
    ("pp_tp", dict(pp=2, tp=2, dp_backend="fsdp"), ALL),
    # Stage cutting of every variant is covered by pp_tp and FSDP2 of every variant by fsdp.
    ("pp_fsdp", dict(pp=2, dp_backend="fsdp"), FAMILIES),
    ("pp_ddp", dict(pp=2, dp_backend="ddp"), ("llama", "jamba")),
    ("ep", dict(ep=2, dp_backend="fsdp"), ("jamba",)),
    ("ep_ddp", dict(ep=4, dp_backend="ddp"), ("jamba",)),
]
SEQ = 36  # even: sequence parallelism shards it over tp=2


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _count_elements(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            n += _local(t).numel()
    return n


def _one_backward(step, cfg, rank: int) -> list[str]:
    """Forward/backward of one step on a few tokens; DTensor parameters whose gradient is placed
    differently from the parameter."""
    g = torch.Generator().manual_seed(rank)
    n_micro = step.n_micro if hasattr(step, "n_micro") else 1
    step.forward_backward([torch.randint(0, cfg.vocab_size, (1, SEQ + 1), generator=g) for _ in range(n_micro)])
    bad = [n for n, p in step.model.named_parameters()
           if isinstance(p, DTensor) and p.grad is not None and tuple(p.grad.placements) != tuple(p.placements)]
    step.zero_grad()
    return bad


def check_layouts(info, world: int) -> list[dict]:
    """Every case above on this rank; the results of all ranks are gathered by the caller."""
    rank = info.rank
    allocated = [0]
    original = sharded_init.to_empty_keeping_hooks

    def counting(model, device):
        out = original(model, device)
        allocated[0] += _count_elements(list(model.parameters()) + list(model.buffers()))
        return out

    results = []
    for layout, pcfg, names in LAYOUTS:
        for name in names:
            # Even vocabulary and kv heads so tp=2 fits every family.
            cfg = dataclasses.replace(tiny_config(name), vocab_size=98, n_kv_heads=2)
            job = JobConfig(model=cfg, parallel=ParallelConfig(**pcfg),
                            train=TrainConfig(seed=7, global_batch_size=8, micro_batch_size=2))
            dims = ParallelDims.from_config(job.parallel, world)
            mesh = build_mesh(dims, "cpu")
            allocated[0] = 0
            sharded_init.to_empty_keeping_hooks = counting
            try:
                step = build_train_step(job, dims, mesh, info)
            finally:
                sharded_init.to_empty_keeping_hooks = original
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
            names_held = [None] * world
            dist.all_gather_object(names_held, sorted(held))
            covered = set().union(*names_held)
            results.append({"layout": layout, "model": name, "rank": rank, "max_abs_err": worst,
                            "mismatched": mismatched[:5], "uncovered": sorted(set(ref) - covered)[:5],
                            "n_tensors": len(ref), "n_held": len(held), "allocated": allocated[0],
                            "local": _count_elements(held.values()), "whole": _count_elements(ref.values()),
                            # Only where no FSDP2 places the gradients (it redistributes them itself).
                            "bad_grad_placements": _one_backward(step, cfg, rank)[:5] if dims.tp > 1 and dims.dp == 1
                            else None})
            del step
    return results
