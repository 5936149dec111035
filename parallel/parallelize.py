"""Apply the configured parallelism to a plain model, in the fixed order of STYLE.md section 3:
tensor/sequence parallel -> expert parallel -> activation checkpointing -> compile -> data parallel
(DDP or FSDP2; with expert parallelism the experts are reduced over "dp_rep" only, see
parallel/expert_parallel.py).

The model either holds its initial weights, identical on every rank (same seed): tensor
parallelism scatters them from tp rank 0's copy and DDP broadcasts rank 0's; or it is on the meta
device and `init_fn(model)` allocates and fills this rank's shards after the sharding layouts (TP,
EP, FSDP2) and before DDP (sharded start, parallel/init.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from titanforge.parallel.config import ParallelConfig
from titanforge.parallel.data_parallel import apply_activation_checkpointing, apply_compile, apply_ddp
from titanforge.parallel.mesh import ParallelDims

InitFn = Callable[[nn.Module], None]


def parallelize(model: nn.Module, family: str, dims: ParallelDims, mesh: DeviceMesh | None, cfg: ParallelConfig,
                device: torch.device, *, activation_checkpointing: bool = False, compile: bool = False,
                init_fn: InitFn | None = None) -> nn.Module:
    if dims.tp > 1:
        from titanforge.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"], family, sequence_parallel=True, loss_parallel=True)
    context_fn = None
    if dims.cp > 1:
        from titanforge.parallel.context import apply_context_parallel

        cg = apply_context_parallel(model, family, mesh["cp"], cfg.cp_split)
        # The recompute replays the states each block received instead of receiving them again.
        context_fn = cg.checkpoint_contexts
    if dims.ep > 1:
        from titanforge.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, mesh["ep"])
    if activation_checkpointing:
        apply_activation_checkpointing(model, context_fn)
    if compile:
        apply_compile(model)
    if dims.dp * dims.cp > 1:
        # Context-parallel ranks reduce gradients with the data-parallel ones (mesh "dp_cp"; the
        # same ranks as "dp" when cp = 1): each holds the gradient of its part of the sequence.
        if cfg.dp_backend == "fsdp":
            from titanforge.parallel.fsdp import apply_fsdp, mixed_precision_policy

            if dims.ep > 1:
                from titanforge.parallel.expert_parallel import shard_experts_fsdp

                # The same policy as apply_fsdp's for the rest of the model.
                shard_experts_fsdp(model, mesh["dp_rep"], mp_policy=mixed_precision_policy(model))
            model = apply_fsdp(model, mesh["dp_cp"])
            if init_fn is not None:
                init_fn(model)
        else:
            if init_fn is not None:
                init_fn(model)
            if dims.ep > 1:
                from titanforge.parallel.expert_parallel import ignore_experts_in_ddp

                ignore_experts_in_ddp(model, mesh["dp_rep"])
            model = apply_ddp(model, device)
    elif init_fn is not None:
        init_fn(model)
    return model


def no_grad_sync(model: nn.Module, backend: str):
    """Skip the gradient reduction for a non-final micro-batch of an accumulated step."""
    if backend == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        from titanforge.parallel.fsdp import no_gradient_sync

        # dp = 1 (tensor parallelism alone) leaves the model unsharded: nothing to hold back.
        return no_gradient_sync(model) if isinstance(model, FSDPModule) else contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def finish_grad_reduction(model: nn.Module) -> None:
    """After the last micro-batch's backward: reductions DDP/FSDP2 do not do themselves (the
    experts' gradients over "dp_rep" under DDP with expert parallelism); a no-op otherwise."""
    from titanforge.parallel.expert_parallel import expert_modules, reduce_expert_grads

    if expert_modules(model):
        reduce_expert_grads(model)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm over every shard and mesh, as a plain tensor; clips when max_norm is finite."""
    from titanforge.parallel.grad_norm import clip_grad_norm_

    return clip_grad_norm_(model, max_norm)
