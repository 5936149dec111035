"""MoE permutation and weighted un-permutation as Triton row gathers, forward and backward.

With src[i] = order[i] // k (the token of sorted row i) and pos[n, j] the sorted row of token n's
slot j (-1 when dropped by the capacity rule), every pass is a gather that one program per block
of output rows writes alone:

    permute     x_sorted[i] = x[src[i]]                    backward: dx[n] = Σ_j dy[pos[n, j]]
    unpermute   out[n] = Σ_j w[n, j] · y[pos[n, j]]         backward: dy[i] = w[order[i]] · dout[src[i]],
                                                                      dw[n, j] = <dout[n], y[pos[n, j]]>

Arithmetic in float32; outputs in the data's dtype (dw in the weights' dtype). Registered as
torch.library custom ops (`titanforge::moe_permute`, `titanforge::moe_unpermute`).
Axis glossary: N tokens, K experts per token, M kept assignments, C width; BM rows, BC columns per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from titanforge.kernels.dispatch import interpreting


@triton.jit
def moe_gather_kernel(X, SRC, W, WIDX, OUT, M, C, HAS_W: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """OUT[i] = X[SRC[i]] (· W[WIDX[i]])."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = o_m < M
    b_src = tl.load(SRC + o_m, mask=m_m, other=0).to(tl.int64)
    if HAS_W:
        b_w = tl.load(W + tl.load(WIDX + o_m, mask=m_m, other=0), mask=m_m, other=0.).to(tl.float32)
    for c0 in range(0, C, BC):
        o_c = c0 + tl.arange(0, BC)
        m = m_m[:, None] & (o_c < C)[None, :]
        b_x = tl.load(X + b_src[:, None] * C + o_c[None, :], mask=m, other=0.).to(tl.float32)
        if HAS_W:
            b_x *= b_w[:, None]
        tl.store(OUT + o_m[:, None].to(tl.int64) * C + o_c[None, :], b_x.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def moe_gather_sum_kernel(Y, POS, W, OUT, N, C, K: tl.constexpr, HAS_W: tl.constexpr, BM: tl.constexpr,
                          BC: tl.constexpr):
    """OUT[n] = Σ_j (W[n, j] ·) Y[POS[n, j]] over the slots with POS >= 0."""
    o_n = tl.program_id(0) * BM + tl.arange(0, BM)
    m_n = o_n < N
    for c0 in range(0, C, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c < C
        b_acc = tl.zeros([BM, BC], dtype=tl.float32)
        for j in range(K):
            b_pos = tl.load(POS + o_n * K + j, mask=m_n, other=-1)
            m_p = b_pos >= 0
            b_y = tl.load(Y + b_pos.to(tl.int64)[:, None] * C + o_c[None, :], mask=m_p[:, None] & m_c[None, :],
                          other=0.).to(tl.float32)
            if HAS_W:
                b_y *= tl.load(W + o_n * K + j, mask=m_n & m_p, other=0.).to(tl.float32)[:, None]
            b_acc += b_y
        tl.store(OUT + o_n[:, None].to(tl.int64) * C + o_c[None, :], b_acc.to(OUT.dtype.element_ty),
                 mask=m_n[:, None] & m_c[None, :])


@triton.jit
def moe_unpermute_bwd_kernel_weights(DOUT, Y, POS, DW, N, C, K: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """DW[n, j] = <DOUT[n], Y[POS[n, j]]> (0 for a dropped slot)."""
    o_n = tl.program_id(0) * BM + tl.arange(0, BM)
    m_n = o_n < N
    for j in range(K):
        b_pos = tl.load(POS + o_n * K + j, mask=m_n, other=-1)
        m_p = b_pos >= 0
        b_dot = tl.zeros([BM], dtype=tl.float32)
        for c0 in range(0, C, BC):
            o_c = c0 + tl.arange(0, BC)
            m_c = o_c < C
            b_do = tl.load(DOUT + o_n[:, None].to(tl.int64) * C + o_c[None, :], mask=m_n[:, None] & m_c[None, :],
                           other=0.).to(tl.float32)
            b_y = tl.load(Y + b_pos.to(tl.int64)[:, None] * C + o_c[None, :], mask=m_p[:, None] & m_c[None, :],
                          other=0.).to(tl.float32)
            b_dot += tl.sum(b_do * b_y, axis=1)
        tl.store(DW + o_n * K + j, b_dot.to(DW.dtype.element_ty), mask=m_n)


def _tiles(rows: int, C: int) -> tuple[int, int]:
    BC = min(triton.next_power_of_2(C), 1024)
    if interpreting():
        return max(1, min(triton.next_power_of_2(rows), 65536 // BC)), BC
    return max(1, 4096 // BC), BC


def _inverse(order: torch.Tensor, n_slots: int) -> torch.Tensor:
    """pos [n_slots] int32: the sorted row of each assignment, -1 where it was dropped."""
    pos = torch.full((n_slots,), -1, device=order.device, dtype=torch.int32)
    pos[order] = torch.arange(order.numel(), device=order.device, dtype=torch.int32)
    return pos


def _gather(x, src, out_rows, w=None, widx=None):
    C = x.shape[1]
    out = x.new_empty(out_rows, C)
    BM, BC = _tiles(out_rows, C)
    moe_gather_kernel[(triton.cdiv(out_rows, BM),)](x, src, w, widx, out, out_rows, C, HAS_W=w is not None, BM=BM,
                                                   BC=BC)
    return out


def _gather_sum(y, pos, n_tokens, k, w=None):
    C = y.shape[1]
    out = y.new_empty(n_tokens, C)
    BM, BC = _tiles(n_tokens, C)
    moe_gather_sum_kernel[(triton.cdiv(n_tokens, BM),)](y, pos, w, out, n_tokens, C, K=k, HAS_W=w is not None,
                                                       BM=BM, BC=BC)
    return out


@torch.library.custom_op("titanforge::moe_permute", mutates_args=())
def moe_permute(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """x [N, C] contiguous, order [M] -> x[order // k] [M, C]."""
    return _gather(x, torch.div(order, k, rounding_mode="floor"), order.numel())


@moe_permute.register_fake
def _(x, order, k):
    return x.new_empty(order.shape[0], x.shape[1])


def _permute_setup(ctx, inputs, output):
    x, order, k = inputs
    ctx.save_for_backward(order)
    ctx.k, ctx.n = k, x.shape[0]


def _permute_backward(ctx, dy):
    (order,) = ctx.saved_tensors
    return moe_permute_bwd(dy.contiguous(), order, ctx.k, ctx.n), None, None


@torch.library.custom_op("titanforge::moe_permute_bwd", mutates_args=())
def moe_permute_bwd(dy: torch.Tensor, order: torch.Tensor, k: int, n_tokens: int) -> torch.Tensor:
    return _gather_sum(dy, _inverse(order, n_tokens * k), n_tokens, k)


@moe_permute_bwd.register_fake
def _(dy, order, k, n_tokens):
    return dy.new_empty(n_tokens, dy.shape[1])


moe_permute.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("titanforge::moe_unpermute", mutates_args=())
def moe_unpermute(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """y [M, C], order [M], weights [N, k] (contiguous) -> [N, C]."""
    return _gather_sum(y, _inverse(order, weights.numel()), n_tokens, weights.shape[1], weights)


@moe_unpermute.register_fake
def _(y, order, weights, n_tokens):
    return y.new_empty(n_tokens, y.shape[1])


@torch.library.custom_op("titanforge::moe_unpermute_bwd", mutates_args=())
def moe_unpermute_bwd(dout: torch.Tensor, y: torch.Tensor, order: torch.Tensor,
                      weights: torch.Tensor) -> list[torch.Tensor]:
    """-> [dy [M, C], dweights [N, k]]."""
    N, k = weights.shape
    C = y.shape[1]
    dy = _gather(dout, torch.div(order, k, rounding_mode="floor"), order.numel(), weights, order)
    dw = torch.empty_like(weights)
    BM, BC = _tiles(N, C)
    moe_unpermute_bwd_kernel_weights[(triton.cdiv(N, BM),)](dout, y, _inverse(order, N * k), dw, N, C, K=k, BM=BM,
                                                           BC=BC)
    return [dy, dw]


@moe_unpermute_bwd.register_fake
def _(dout, y, order, weights):
    return [torch.empty_like(y), torch.empty_like(weights)]


def _unpermute_setup(ctx, inputs, output):
    y, order, weights, n_tokens = inputs
    ctx.save_for_backward(y, order, weights)


def _unpermute_backward(ctx, dout):
    y, order, weights = ctx.saved_tensors
    dy, dw = moe_unpermute_bwd(dout.contiguous(), y, order, weights)
    return dy, None, dw, None


moe_unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


def permute_triton(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    return moe_permute(x.contiguous(), order, k)


def unpermute_triton(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, n_tokens: int) -> torch.Tensor:
    return moe_unpermute(y_sorted.contiguous(), order, weights.contiguous(), n_tokens)
