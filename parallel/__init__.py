"""Parallelism applied to the plain single-device models (STYLE.md section 3)."""

from titanforge.parallel.data_parallel import apply_activation_checkpointing, apply_compile, apply_ddp
from titanforge.parallel.mesh import LayoutError, ParallelDims, build_mesh

__all__ = ["LayoutError", "ParallelDims", "apply_activation_checkpointing", "apply_compile", "apply_ddp", "build_mesh"]
