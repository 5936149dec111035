"""Fused RMSNorm (times an optional gate, after an optional residual add) as Triton kernels.

    h = x (+ residual),   y = h / sqrt(mean(h^2) + eps) * weight (* gate)

Forward is one pass over rows of the last dim that writes y, h (when a residual is added: the new
residual stream) and one 1/rms per row; backward is one pass that writes dx (= d residual) and the
gate's gradient, and each program's partial sum of the weight's gradient (summed on the host).
Arithmetic in float32 whatever the storage dtype (float16, bfloat16, float32). README.md has the
backward:  with x̂ = h·rstd and dŷ = dy·weight(·gate),  dh = rstd·(dŷ - x̂·mean(dŷ·x̂)).

The ops are registered with torch.library (`titanforge::rms_norm_fwd` / `_bwd`) with fake
implementations and an autograd formula, so torch.compile keeps them as single graph nodes.

Axis glossary: M rows (all leading dims), N normalised width; BM rows and BN columns per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from titanforge.kernels.dispatch import interpreting


@triton.jit
def rms_norm_fwd_kernel(X, R, G, W, Y, H, RSTD, M, N, eps,
                        HAS_R: tl.constexpr, HAS_G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    i_m = tl.program_id(0)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    m_m, m_n = o_m < M, o_n < N
    m_x = m_m[:, None] & m_n[None, :]
    o_x = o_m[:, None].to(tl.int64) * N + o_n[None, :]
    b_h = tl.load(X + o_x, mask=m_x, other=0.).to(tl.float32)
    if HAS_R:
        b_h += tl.load(R + o_x, mask=m_x, other=0.).to(tl.float32)
        tl.store(H + o_x, b_h.to(H.dtype.element_ty), mask=m_x)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_h * b_h, axis=1) / N + eps)
    b_w = tl.load(W + o_n, mask=m_n, other=0.).to(tl.float32)
    b_y = b_h * b_rstd[:, None] * b_w[None, :]
    if HAS_G:
        b_y *= tl.load(G + o_x, mask=m_x, other=0.).to(tl.float32)
    tl.store(Y + o_x, b_y.to(Y.dtype.element_ty), mask=m_x)
    tl.store(RSTD + o_m, b_rstd, mask=m_m)


@triton.jit
def rms_norm_bwd_kernel(H, G, W, RSTD, DY, DH_OUT, DX, DG, DW, M, N,
                        HAS_G: tl.constexpr, HAS_DH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    i_m = tl.program_id(0)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    m_m, m_n = o_m < M, o_n < N
    m_x = m_m[:, None] & m_n[None, :]
    o_x = o_m[:, None].to(tl.int64) * N + o_n[None, :]
    b_h = tl.load(H + o_x, mask=m_x, other=0.).to(tl.float32)
    b_rstd = tl.load(RSTD + o_m, mask=m_m, other=0.)
    b_w = tl.load(W + o_n, mask=m_n, other=0.).to(tl.float32)
    b_dy = tl.load(DY + o_x, mask=m_x, other=0.).to(tl.float32)
    b_xhat = b_h * b_rstd[:, None]
    if HAS_G:
        b_g = tl.load(G + o_x, mask=m_x, other=0.).to(tl.float32)
        tl.store(DG + o_x, (b_dy * b_xhat * b_w[None, :]).to(DG.dtype.element_ty), mask=m_x)
        b_dy = b_dy * b_g
    # Partial weight gradient of this program's rows; rows past M hold zeros.
    tl.store(DW + i_m.to(tl.int64) * N + o_n, tl.sum(b_dy * b_xhat, axis=0), mask=m_n)
    b_dyw = b_dy * b_w[None, :]
    b_c = tl.sum(b_dyw * b_xhat, axis=1) / N
    b_dx = b_rstd[:, None] * (b_dyw - b_xhat * b_c[:, None])
    if HAS_DH:
        b_dx += tl.load(DH_OUT + o_x, mask=m_x, other=0.).to(tl.float32)
    tl.store(DX + o_x, b_dx.to(DX.dtype.element_ty), mask=m_x)


def _blocks(M: int, N: int) -> tuple[int, int]:
    """(BM, BN): a whole row per program; several short rows per program so each moves ~16 KB on a
    GPU; the interpreter pays per program, so there programs take up to 64k elements."""
    BN = triton.next_power_of_2(N)
    budget = 65536 if interpreting() else 4096
    BM = max(1, min(triton.next_power_of_2(M), budget // BN))
    return BM, BN


@torch.library.custom_op("titanforge::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, residual: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, gate, residual [M, N] contiguous, weight [N] -> (y [M, N], h [M, N] (x + residual; empty
    without a residual), rstd [M] float32)."""
    M, N = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    BM, BN = _blocks(M, N)
    rms_norm_fwd_kernel[(triton.cdiv(M, BM),)](x, residual, gate, weight, y, h, rstd, M, N, eps,
                                              HAS_R=residual is not None, HAS_G=gate is not None, BM=BM, BN=BN)
    return y, h, rstd


@rms_norm_fwd.register_fake
def _(x, weight, gate, residual, eps):
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), h, x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("titanforge::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(h: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, rstd: torch.Tensor,
                 dy: torch.Tensor, dh_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [M, N] (also d residual), dweight [N] float32, dgate [M, N] (empty without a gate))."""
    M, N = h.shape
    BM, BN = _blocks(M, N)
    grid = triton.cdiv(M, BM)
    dx = torch.empty_like(h)
    dg = torch.empty_like(h) if gate is not None else h.new_empty(0)
    dw = torch.empty(grid, N, device=h.device, dtype=torch.float32)
    rms_norm_bwd_kernel[(grid,)](h, gate, weight, rstd, dy, dh_out, dx, dg, dw, M, N,
                                 HAS_G=gate is not None, HAS_DH=dh_out is not None, BM=BM, BN=BN)
    return dx, dw.sum(0), dg


@rms_norm_bwd.register_fake
def _(h, weight, gate, rstd, dy, dh_out):
    dg = torch.empty_like(h) if gate is not None else h.new_empty(0)
    return torch.empty_like(h), weight.new_empty(weight.shape, dtype=torch.float32), dg


def _setup(ctx, inputs, output):
    x, weight, gate, residual, eps = inputs
    y, h, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, gate, rstd)
    ctx.has_residual, ctx.has_gate = residual is not None, gate is not None


def _backward(ctx, dy, dh, drstd):
    h, weight, gate, rstd = ctx.saved_tensors
    dh_out = dh.contiguous() if ctx.has_residual and dh is not None else None
    dx, dw, dg = rms_norm_bwd(h, weight, gate, rstd, dy.contiguous(), dh_out)
    return (dx, dw.to(weight.dtype), dg if ctx.has_gate else None, dx if ctx.has_residual else None, None)


rms_norm_fwd.register_autograd(_backward, setup_context=_setup)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., N], weight [N], gate (broadcastable to x), residual (x's shape) -> y [..., N] in x's dtype,
    or (y, x + residual) with a residual. Shapes are checked by the caller (kernels/norms)."""
    shape, N = x.shape, x.shape[-1]
    rows = lambda t: t.expand(shape).reshape(-1, N).contiguous()  # noqa: E731
    x2 = rows(x)
    g2 = rows(gate.to(x.dtype)) if gate is not None else None
    r2 = rows(residual.to(x.dtype)) if residual is not None else None
    y, h, _ = rms_norm_fwd(x2, weight.contiguous(), g2, r2, float(eps))
    if residual is None:
        return y.view(shape)
    return y.view(shape), h.view(shape)
