"""Apply the configured parallelism to a plain model, in the fixed order of STYLE.md section 3:
tensor/sequence parallel -> activation checkpointing -> compile -> data parallel (DDP or FSDP2).

The model must already hold its initial weights, identical on every rank (same seed): tensor
parallelism scatters them from tp rank 0's copy and DDP broadcasts rank 0's.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from titanforge.parallel.config import ParallelConfig
from titanforge.parallel.data_parallel import apply_activation_checkpointing, apply_compile, apply_ddp
from titanforge.parallel.mesh import ParallelDims


def parallelize(model: nn.Module, family: str, dims: ParallelDims, mesh: DeviceMesh | None, cfg: ParallelConfig,
                device: torch.device, *, activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    if dims.tp > 1:
        from titanforge.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"], family, sequence_parallel=True, loss_parallel=True)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if dims.dp > 1:
        if cfg.dp_backend == "fsdp":
            from titanforge.parallel.fsdp import apply_fsdp

            model = apply_fsdp(model, mesh["dp"])
        else:
            model = apply_ddp(model, device)
    return model


def no_grad_sync(model: nn.Module, backend: str):
    """Skip the gradient reduction for a non-final micro-batch of an accumulated step."""
    if backend == "fsdp":
        from titanforge.parallel.fsdp import no_gradient_sync

        return no_gradient_sync(model)
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm over every shard, as a plain tensor; clips when max_norm is finite."""
    from titanforge.parallel.fsdp import clip_grad_norm_

    return clip_grad_norm_(model, max_norm)
