"""Depthwise causal conv1d followed by SiLU: the Mamba mixers' short convolution.

Two paths with one contract, `causal_conv1d_silu(x, weight, bias, conv_state) -> (silu(conv(x)),
new conv_state)`:
- CPU float32/float64 with a C compiler: one fused C loop (`csrc/causal_conv.c`, built by
  kernels/native.py). Forward writes only y; backward recomputes the pre-activation (K
  multiply-adds per element) and scatters its gradient to the K inputs, the taps and the bias
  in the same pass.
- otherwise (`backend="torch"`, CUDA, torch.compile, no compiler): `causal_conv1d` below, K
  shifted multiply-adds in the [B, T, ch] layout, then F.silu.

The reference both are tested against is `torch.nn.functional.conv1d` with left padding.
Axis glossary: B batch, T time, D (ch) channels, K conv width.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from titanforge.kernels.dispatch import pick
from titanforge.kernels.native import check_inputs, kernel, load, native_status, ptr

SOURCE = str(Path(__file__).with_name("csrc") / "causal_conv.c")
_i64, _int = ctypes.c_int64, ctypes.c_int


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  conv_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv. x [B, T, ch], weight [ch, 1, K], conv_state [B, ch, K-1] (the last
    K-1 inputs, zeros if None; HF's cache layout) -> (y [B, T, ch], new conv_state [B, ch, K-1]).

    Written as K shifted multiply-adds in the [B, T, ch] layout: no transposes, and its backward
    is several times faster on CPU than `conv1d`'s depthwise backward.
    """
    K, T = weight.shape[-1], x.shape[1]
    if conv_state is None:
        conv_state = x.new_zeros(x.shape[0], x.shape[2], K - 1)
    xc = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)  # [B, K-1+T, ch]
    # [K, ch]: each tap's weights contiguous, so the multiply-adds take the vectorised path.
    w = weight[:, 0].t().contiguous().to(x.dtype)
    y = xc[:, K - 1:] * w[K - 1]
    for k in range(K - 1):
        y = torch.addcmul(y, xc[:, k:k + T], w[k])
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y, xc[:, xc.shape[1] - (K - 1):].transpose(1, 2)


def available() -> bool:
    return load(SOURCE) is not None


def status() -> str:
    return native_status(SOURCE)


class CausalConvSiluFunction(torch.autograd.Function):
    """x [B, T, D], pre [B, K-1, D] (inputs before t = 0), wT [K, D], bias [D] or None ->
    silu(conv(x)) [B, T, D]. Saves only its inputs."""

    @staticmethod
    def forward(ctx, x, pre, wT, bias):
        Bsz, T, D = x.shape
        K = wT.shape[0]
        check_inputs("causal conv", x, pre, wT, bias)
        x, pre, wT = x.contiguous(), pre.contiguous(), wT.contiguous()
        bias = bias.contiguous() if bias is not None else None
        y = torch.empty_like(x)
        kernel(SOURCE, "causal_conv_silu_fwd", x.dtype)(ptr(x), ptr(pre), ptr(wT), ptr(bias), ptr(y), _i64(Bsz),
                                                        _i64(T), _i64(D), _i64(K), _int(torch.get_num_threads()))
        ctx.save_for_backward(x, pre, wT, bias)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, pre, wT, bias = ctx.saved_tensors
        Bsz, T, D = x.shape
        K = wT.shape[0]
        gx, gpre = torch.empty_like(x), torch.empty_like(pre)
        gw, gb = x.new_empty(Bsz, K, D), x.new_empty(Bsz, D)
        # a name holds the contiguous copy: ptr() of a temporary would hand C memory already freed
        gy = gy.contiguous()
        kernel(SOURCE, "causal_conv_silu_bwd", x.dtype)(
            ptr(x), ptr(pre), ptr(wT), ptr(bias), ptr(gy), ptr(gx), ptr(gpre), ptr(gw), ptr(gb),
            _i64(Bsz), _i64(T), _i64(D), _i64(K), _int(torch.get_num_threads()))
        return gx, gpre, gw.sum(0), gb.sum(0) if bias is not None else None


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       conv_state: torch.Tensor | None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """silu(causal depthwise conv(x)) and the new conv state; shapes as in `causal_conv1d`.
    backend (kernels/dispatch.py): "auto" runs Triton for CUDA tensors, the C loop for CPU float32/float64
    where it builds, else the formulas; "triton" / "native" require theirs; "torch" the formulas."""
    path = pick("causal_conv", backend, x, weight, bias, conv_state, native_source=SOURCE)
    if path == "torch":
        y, state = causal_conv1d(x, weight, bias, conv_state)
        return F.silu(y), state
    K = weight.shape[-1]
    if conv_state is None:
        pre = x.new_zeros(x.shape[0], K - 1, x.shape[2])
    else:
        pre = conv_state.transpose(1, 2).to(x.dtype)
    wT = weight[:, 0].t().to(x.dtype)
    if path == "triton":
        from titanforge.kernels.mamba.triton import causal_conv_silu_triton

        y = causal_conv_silu_triton(x, pre, wT, bias)
    else:
        y = CausalConvSiluFunction.apply(x, pre, wT, None if bias is None else bias.to(x.dtype))
    # The last K-1 inputs (fewer than K-1 steps: the tail of the old state first).
    state = torch.cat([pre, x[:, -(K - 1):]], 1)[:, -(K - 1):].transpose(1, 2) if K > 1 else pre.transpose(1, 2)
    return y, state
