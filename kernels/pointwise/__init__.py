"""Pointwise ops between the matmuls: SwiGLU's gating product and rotary position embeddings.

`swiglu` and `rope` run one fused C loop forward and one backward on CPU float32/float64
(fused_cpu.py) and the plain-PyTorch formulas of naive.py elsewhere (CUDA, low precision,
torch.compile, DTensors, no compiler, `backend="torch"`); both are tested against naive.py.
README.md has the math.
"""

from __future__ import annotations

import torch

from titanforge.kernels.native import use_native
from titanforge.kernels.pointwise import fused_cpu
from titanforge.kernels.pointwise.naive import rope_reference, swiglu_reference

__all__ = ["swiglu", "rope", "swiglu_reference", "rope_reference"]


def swiglu(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(a) * b for a and b of one shape. backend "auto": the C loop for CPU float32/float64
    where it builds; "native" requires it; "torch" never uses it."""
    if a.shape != b.shape:
        raise ValueError(f"swiglu: a {tuple(a.shape)} and b {tuple(b.shape)} must have one shape")
    if not use_native(backend, a, fused_cpu.SOURCE, "SwiGLU", b) or b.dtype != a.dtype or a.numel() == 0:
        return swiglu_reference(a, b)
    return fused_cpu.SwiGLUFunction.apply(a, b)


def rope(x: torch.Tensor, freqs: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Rotate x [B, T, H, D] by freqs [>= T, D/2, 2] (the cos and sin of row t, rotate-half layout:
    pairs (i, i + D/2)); at least float32 arithmetic. backend as in swiglu."""
    if x.dim() != 4 or freqs.dim() != 3 or x.shape[1] > freqs.shape[0] or x.shape[-1] != 2 * freqs.shape[1] \
            or freqs.shape[-1] != 2:
        raise ValueError(f"rope: table {tuple(freqs.shape)} does not cover x {tuple(x.shape)}: need x [B, T, H, D] "
                         f"and freqs [>= T, D/2, 2]; build it with rope_frequencies(head_dim=D, max_seq_len>=T)")
    if not use_native(backend, x, fused_cpu.SOURCE, "RoPE", freqs) or x.numel() == 0:
        return rope_reference(x, freqs)
    return fused_cpu.RopeFunction.apply(x, freqs)
