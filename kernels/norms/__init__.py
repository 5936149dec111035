"""Fused normalisations: RMSNorm (with an optional multiplicative gate) and l2 normalisation.

`rms_norm` (and `add_rms_norm`, the residual add fused in) pick their path by the rule of
kernels/dispatch.py: Triton kernels (triton.py) for CUDA tensors, one fused C loop forward and one
backward on CPU float32/float64 (fused_cpu.py), the plain-PyTorch formulas of naive.py elsewhere
(low precision on CPU, DTensors, no compiler, `backend="torch"`). `l2_normalize` has the C loop and
the formulas. All are tested against naive.py. README.md has the math.
"""

from __future__ import annotations

import torch

from titanforge.kernels.dispatch import pick
from titanforge.kernels.native import use_native
from titanforge.kernels.norms import fused_cpu
from titanforge.kernels.norms.naive import l2_normalize_reference, rms_norm_reference


def rms_norm_triton(*args):
    # Imported on first use: triton is optional, and a CPU run never pays its import.
    from titanforge.kernels.norms.triton import rms_norm_triton as run

    return run(*args)

__all__ = ["rms_norm", "add_rms_norm", "l2_normalize", "rms_norm_reference", "l2_normalize_reference"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None,
             backend: str = "auto") -> torch.Tensor:
    """x [..., N] / sqrt(mean(x^2) + eps) * weight [N] (* gate, broadcastable to x), over the last dim.
    backend "auto": Triton for CUDA tensors, the C loop for CPU float32/float64 where it builds, else
    the formulas (kernels/dispatch.py); "triton" / "native" require theirs; "torch" the formulas."""
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
    path = pick("rms_norm", backend, x, weight, gate, native_source=fused_cpu.SOURCE)
    if path == "triton" and x.numel():
        return rms_norm_triton(x, weight, eps, gate)
    native = path == "native" and weight.dtype == x.dtype and (gate is None or gate.dtype == x.dtype)
    if not native or x.numel() == 0:
        return rms_norm_reference(x, weight, eps, gate)
    return fused_cpu.RMSNormFunction.apply(x, weight, gate, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 gate: torch.Tensor | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h, weight, eps, gate), h) with h = x + residual (both [..., N]): the pre-norm block's
    residual add and norm in one pass on the Triton path (two ops elsewhere)."""
    if residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if pick("rms_norm", backend, x, residual, weight, gate, native_source=fused_cpu.SOURCE) == "triton" and x.numel():
        return rms_norm_triton(x, weight, eps, gate, residual)
    h = x + residual
    return rms_norm(h, weight, eps, gate, backend="torch" if backend == "triton" else backend), h


def l2_normalize(x: torch.Tensor, eps: float = 1e-12, backend: str = "auto") -> torch.Tensor:
    """x [..., N] / max(||x||, eps) over the last dim (as torch.nn.functional.normalize); backend as
    in rms_norm."""
    if not use_native(backend, x, fused_cpu.SOURCE, "l2 normalisation") or x.numel() == 0:
        return l2_normalize_reference(x, eps)
    return fused_cpu.L2NormalizeFunction.apply(x, eps)
