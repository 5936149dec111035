"""RMSNorm (times an optional gate) and l2 normalisation as fused C loops on CPU (`csrc/norms.c`).

The plain-PyTorch forms run 5-8 ops forward and about as many backward, each a full pass over
the tensor plus its dispatch; the Titans MAC loop calls them on [2, 64, 4, 64] tiles 64 times a
layer, where the dispatch is most of the cost. Here forward is one pass that saves one number
per row (1/rms, or the norm), backward one pass. Inputs may be views whose leading dims collapse
to two strided levels (a segment split from a longer sequence, the q and k heads of a fused
projection); outputs are contiguous.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from titanforge.kernels.native import check_inputs, kernel, load, native_status, ptr

SOURCE = str(Path(__file__).with_name("csrc") / "norms.c")
_i64, _int, _f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_double


def available() -> bool:
    return load(SOURCE) is not None


def status() -> str:
    return native_status(SOURCE)


def rows(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(t or a contiguous copy, (O, I, stride_O, stride_I)): t's leading dims as two strided levels
    over rows of its last dim, which must be contiguous."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    dims = [(s, st) for s, st in zip(t.shape[:-1], t.stride()[:-1]) if s != 1]
    merged: list[list[int]] = []
    for size, stride in dims:  # merge a dim into the previous one where they tile evenly
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 2:
        t = t.contiguous()
        merged = [[t.numel() // max(t.shape[-1], 1), t.shape[-1]]]
    while len(merged) < 2:
        merged.insert(0, [1, 0])
    (O, so), (I, si) = merged
    return t, (O, I, so, si)


class RMSNormFunction(torch.autograd.Function):
    """x [..., N], weight [N], gate (x's shape) or None -> x / rms(x) * weight (* gate), contiguous."""

    @staticmethod
    def forward(ctx, x, weight, gate, eps):
        check_inputs("fused RMSNorm", x, weight, gate)
        x, (O, I, sxo, sxi) = rows(x)
        weight = weight.contiguous()
        if gate is not None:
            gate, (gO, gI, sgo, sgi) = rows(gate.expand_as(x))
            if (gO, gI) != (O, I):
                N = x.shape[-1]
                if O == 1 and sxi == N:  # x is contiguous rows: read it in the gate's two levels
                    O, I, sxo, sxi = gO, gI, gI * N, N
                elif gO == 1 and sgi == N:  # and the other way round
                    gO, gI, sgo, sgi = O, I, I * N, N
                else:  # the two views collapse differently: read both contiguous
                    x, gate = x.contiguous(), gate.contiguous()
                    O, I, sxo, sxi = 1, x.numel() // N, 0, N
                    sgo, sgi = 0, N
        else:
            sgo = sgi = 0
        N = x.shape[-1]
        y = x.new_empty(x.shape)
        rstd = x.new_empty(O * I)
        kernel(SOURCE, "rms_norm_fwd", x.dtype)(
            ptr(x), _i64(O), _i64(I), _i64(sxo), _i64(sxi), ptr(gate), _i64(sgo), _i64(sgi), ptr(weight), _i64(N),
            _f64(eps), ptr(y), ptr(rstd), _int(torch.get_num_threads()))
        ctx.save_for_backward(x, weight, gate, rstd)
        ctx.layout = (O, I, sxo, sxi, sgo, sgi)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, gate, rstd = ctx.saved_tensors
        O, I, sxo, sxi, sgo, sgi = ctx.layout
        N, nthreads = x.shape[-1], torch.get_num_threads()
        dy = dy.contiguous()
        dx = x.new_empty(x.shape)
        dg = x.new_empty(x.shape) if gate is not None else None
        dw_part = x.new_empty(nthreads, N)
        kernel(SOURCE, "rms_norm_bwd", x.dtype)(
            ptr(x), _i64(O), _i64(I), _i64(sxo), _i64(sxi), ptr(gate), _i64(sgo), _i64(sgi), ptr(weight), _i64(N),
            ptr(rstd), ptr(dy), ptr(dx), ptr(dg), ptr(dw_part), _int(nthreads))
        return dx, dw_part.sum(0), dg, None


class L2NormalizeFunction(torch.autograd.Function):
    """x [..., N] -> x / max(||x||, eps) over the last dim, contiguous."""

    @staticmethod
    def forward(ctx, x, eps):
        check_inputs("fused l2 normalisation", x)
        x, (O, I, so, si) = rows(x)
        y = x.new_empty(x.shape)
        norm = x.new_empty(O * I)
        kernel(SOURCE, "l2norm_fwd", x.dtype)(ptr(x), _i64(O), _i64(I), _i64(so), _i64(si), _i64(x.shape[-1]),
                                              _f64(eps), ptr(y), ptr(norm), _int(torch.get_num_threads()))
        ctx.save_for_backward(y, norm)
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, norm = ctx.saved_tensors
        dx = torch.empty_like(y)
        dy = dy.contiguous()  # a name holds the copy: ptr() of a temporary would outlive its memory
        kernel(SOURCE, "l2norm_bwd", y.dtype)(ptr(y), ptr(norm), ptr(dy), _i64(norm.numel()),
                                              _i64(y.shape[-1]), _f64(ctx.eps), ptr(dx), _int(torch.get_num_threads()))
        return dx, None
