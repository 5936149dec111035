"""Parallelism applied to the plain single-device models (STYLE.md section 3)."""

from titanforge.parallel.data_parallel import apply_activation_checkpointing, apply_compile, apply_ddp
from titanforge.parallel.fsdp import apply_fsdp, no_gradient_sync
from titanforge.parallel.grad_norm import clip_grad_norm_
from titanforge.parallel.mesh import LayoutError, ParallelDims, build_mesh
from titanforge.parallel.parallelize import clip_grad_norm, finish_grad_reduction, no_grad_sync, parallelize

__all__ = ["LayoutError", "ParallelDims", "apply_activation_checkpointing", "apply_compile", "apply_ddp",
           "apply_fsdp", "build_mesh", "clip_grad_norm", "clip_grad_norm_", "finish_grad_reduction", "no_grad_sync",
           "no_gradient_sync", "parallelize"]
