"""SwiGLU's gating product and rotary embeddings as fused C loops on CPU (`csrc/pointwise.c`).

In the plain-PyTorch forms each is several full passes over a large activation each way: SwiGLU's
silu, mul forward and two muls plus silu_backward backward over [B, T, ffn] (the largest
activation of a block), RoPE's two muls, a neg, a cat and an add forward and as many backward.
Here each direction is one pass. SwiGLU saves a and b only (the plain form also keeps silu(a)).
RoPE reads a head view of a fused projection in place (any strides over B, T, H with the head dim
contiguous); its backward is the inverse rotation of dy, the same loop.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from titanforge.kernels.native import check_inputs, kernel, load, native_status, ptr

SOURCE = str(Path(__file__).with_name("csrc") / "pointwise.c")
_i64, _int = ctypes.c_int64, ctypes.c_int


def available() -> bool:
    return load(SOURCE) is not None


def status() -> str:
    return native_status(SOURCE)


class SwiGLUFunction(torch.autograd.Function):
    """a, b (same shape) -> silu(a) * b, contiguous."""

    @staticmethod
    def forward(ctx, a, b):
        check_inputs("fused SwiGLU", a, b)
        a, b = a.contiguous(), b.contiguous()
        y = torch.empty_like(a)
        kernel(SOURCE, "swiglu_fwd", a.dtype)(ptr(a), ptr(b), _i64(a.numel()), ptr(y), _int(torch.get_num_threads()))
        ctx.save_for_backward(a, b)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        dy = dy.contiguous()  # a name holds the copy: ptr() of a temporary would outlive its memory
        da, db = torch.empty_like(a), torch.empty_like(b)
        kernel(SOURCE, "swiglu_bwd", a.dtype)(ptr(a), ptr(b), ptr(dy), _i64(a.numel()), ptr(da), ptr(db),
                                              _int(torch.get_num_threads()))
        return da, db


def _rotate(x: torch.Tensor, cs: torch.Tensor, sign: int) -> torch.Tensor:
    """The C loop on x [B, T, H, D] (any strides, head dim contiguous) -> contiguous y."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, T, H, D = x.shape
    y = x.new_empty(B, T, H, D)
    kernel(SOURCE, "rope", x.dtype)(ptr(x), _i64(B), _i64(T), _i64(H), _i64(D), *map(_i64, x.stride()[:3]),
                                    ptr(cs), _int(sign), ptr(y), _int(torch.get_num_threads()))
    return y


class RopeFunction(torch.autograd.Function):
    """x [B, T, H, D], freqs [>= T, D/2, 2] (no gradient) -> x rotated, contiguous."""

    @staticmethod
    def forward(ctx, x, freqs):
        check_inputs("fused RoPE", x)
        # the table as [T][2][D/2]: the cos row, then the sin row, each contiguous for the vector loop
        cs = freqs[:x.shape[1]].to(x.dtype).transpose(1, 2).contiguous()
        ctx.save_for_backward(cs)
        return _rotate(x, cs, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (cs,) = ctx.saved_tensors
        return _rotate(dy, cs, -1), None
