"""Fused normalisations: RMSNorm (with an optional multiplicative gate) and l2 normalisation.

`rms_norm` and `l2_normalize` run one fused C loop forward and one backward on CPU float32/float64
(fused_cpu.py) and the plain-PyTorch formulas of naive.py elsewhere (CUDA, low precision,
torch.compile, no compiler, `backend="torch"`); both are tested against naive.py. README.md has
the math.
"""

from __future__ import annotations

import torch

from titanforge.kernels.native import use_native
from titanforge.kernels.norms import fused_cpu
from titanforge.kernels.norms.naive import l2_normalize_reference, rms_norm_reference

__all__ = ["rms_norm", "l2_normalize", "rms_norm_reference", "l2_normalize_reference"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None,
             backend: str = "auto") -> torch.Tensor:
    """x [..., N] / sqrt(mean(x^2) + eps) * weight [N] (* gate, broadcastable to x), over the last dim.
    backend "auto": the C loop for CPU float32/float64 where it builds; "native" requires it; "torch"
    never uses it."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected [{x.shape[-1]}] "
                         f"(the last dim of x {tuple(x.shape)})")
    if gate is not None and gate.shape != x.shape:  # (torch.broadcast_shapes costs ~20 us a call)
        try:
            fits = torch.broadcast_shapes(gate.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"rms_norm: gate {tuple(gate.shape)} does not broadcast to x {tuple(x.shape)}")
    native = use_native(backend, x, fused_cpu.SOURCE, "RMSNorm", weight, gate) and weight.dtype == x.dtype and (
        gate is None or gate.dtype == x.dtype)
    if not native or x.numel() == 0:
        return rms_norm_reference(x, weight, eps, gate)
    return fused_cpu.RMSNormFunction.apply(x, weight, gate, eps)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12, backend: str = "auto") -> torch.Tensor:
    """x [..., N] / max(||x||, eps) over the last dim (as torch.nn.functional.normalize); backend as
    in rms_norm."""
    if not use_native(backend, x, fused_cpu.SOURCE, "l2 normalisation") or x.numel() == 0:
        return l2_normalize_reference(x, eps)
    return fused_cpu.L2NormalizeFunction.apply(x, eps)
