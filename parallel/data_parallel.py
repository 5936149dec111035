"""Data parallelism and the per-module transforms applied before it.

Order (STYLE.md section 3): TP/SP/EP -> activation checkpointing -> compile -> data parallel.
Activation checkpointing and compile work per block of `model.layers`, so parameter names keep
their meaning for checkpoints (the checkpoint wrapper's prefix is stripped on save).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.nn.parallel import DistributedDataParallel


def apply_activation_checkpointing(model: nn.Module, context_fn=None) -> nn.Module:
    """Recompute each block's activations in backward instead of storing them (non-reentrant
    checkpointing). `context_fn`: torch.utils.checkpoint's pair of (forward, recompute) context
    managers per call; context parallelism passes one that replays the received states."""
    kwargs = {"context_fn": context_fn} if context_fn is not None else {}
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=True, **kwargs)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile each block separately: repeated blocks share one compiled graph."""
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Gradient all-reduce over all ranks (gloo on CPU, NCCL on GPU)."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)
