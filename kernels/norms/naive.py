"""References for the fused norms: the plain-PyTorch formulas, computed in at least float32.

Axis glossary: N the normalised (last) width.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None):
    """x / sqrt(mean(x^2) + eps) * weight (* gate), over the last dim; low precision computed in float32."""
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)
    if gate is not None:
        y = y * gate.to(x.dtype)
    return y.to(dtype)


def l2_normalize_reference(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||, eps) over the last dim (torch.nn.functional.normalize)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)
