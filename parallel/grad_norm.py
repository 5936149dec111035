"""The global gradient norm, and clipping by it, for every layout.

Gradients may be plain tensors (one process, DDP), DTensors on one mesh (TP, FSDP2) or on several
meshes at once (expert weights on "ep" or "dp_rep" x "ep" beside the rest on "dp"; pipeline
stages). foreach kernels and DTensor reductions cannot mix meshes, so the norm is taken per
(mesh, placements) group, each shard counted once by DTensor's own reduction, and the groups'
squares are summed in float64. Pipeline parallelism adds the other stages' squares over the pp
group (trainer/pipeline_step.py) before taking the root.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _grad_groups(params) -> list[list[torch.Tensor]]:
    groups: dict = {}
    for p in params:
        g = p.grad
        if g is not None:
            key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append(g)
    return list(groups.values())


@torch.no_grad()
def grad_norm_squared(params) -> torch.Tensor:
    """Sum of squared gradient entries of `params` over all their shards, as a float64 CPU scalar."""
    total = torch.zeros((), dtype=torch.float64)
    for grads in _grad_groups(params):
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        total = total + norm.double().cpu() ** 2
    return total


@torch.no_grad()
def scale_grads_(params, max_norm: float, total: torch.Tensor) -> None:
    """Clip: scale the gradients of `params` by max_norm / total when that is below 1 and total is finite."""
    if not torch.isfinite(total):
        return
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        for grads in _grad_groups(params):
            torch._foreach_mul_(grads, coef)


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip `model`'s gradients by their global 2-norm over all shards and meshes; returns the norm
    (a plain float64 tensor, the same on every rank)."""
    if max_norm <= 0:
        raise ValueError(f"clip_grad_norm_: max_norm={max_norm} must be > 0 (0 means no clipping: do not call)")
    params = list(model.parameters())
    total = grad_norm_squared(params).sqrt()
    scale_grads_(params, max_norm, total)
    return total
