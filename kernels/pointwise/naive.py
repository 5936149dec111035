"""The readable references: the plain-PyTorch formulas the fused loops are tested against (and run
wherever those do not: CUDA, low precision, torch.compile, tensor subclasses, backend="torch").

Axis glossary: B batch, T time, H heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b, SwiGLU's gating (Shazeer 2020), in the inputs' dtype."""
    return F.silu(a) * b


def rope_reference(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by freqs [>= T, D/2, 2] (cos, sin) in the rotate-half layout: pair
    (i, i + D/2) turns by the angle of row t, entry i. Computed in at least float32 (bf16 rotations
    drift); float64 stays float64."""
    T, D = x.shape[1], x.shape[-1]
    cos = freqs[:T, :, 0].repeat(1, 2)[None, :, None, :]  # [1, T, 1, D]
    sin = freqs[:T, :, 1].repeat(1, 2)[None, :, None, :]
    x1, x2 = x.split(D // 2, -1)  # split, not slicing: one backward cat instead of two zero-filled grads
    rotated = torch.cat([-x2, x1], dim=-1)
    compute = torch.promote_types(x.dtype, torch.float32)
    return (x.to(compute) * cos + rotated.to(compute) * sin).to(x.dtype)
