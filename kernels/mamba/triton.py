"""Mamba-1's selective scan and the causal depthwise conv1d + SiLU as Triton kernels, forward and backward.

Selective scan (Gu & Dao 2023, arXiv 2312.00752; the recurrence of naive.py):

    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t u_t) B_t,    y_t = (h_t C_t + D u_t) · silu(z_t)

One program owns a batch row and BD channels with their whole [BD, N] state, and walks time in
blocks of BT steps. Inside a block the linear recurrence is `tl.associative_scan` over the pairs
(a_t, x_t) = (exp(Δ_t A), Δ_t u_t B_t) with (a1, b1)∘(a2, b2) = (a1 a2, a2 b1 + b2), all BT·BD·N
elements at once; the state carried into the block is added as (Π a)·h. The forward saves only the
state at each block's start (a [B, T/BT, D, N] float32 checkpoint, 1/BT of the full states).

The backward walks the blocks in reverse. Per block it recomputes h_t from the checkpoint (the same
scan), then the adjoint g_t = dL/dh_t, which obeys g_t = exp(Δ_{t+1} A) g_{t+1} + gy_t C_t: the same
combine run as a reverse scan, with the carry from the later block. With e_t = exp(Δ_t A) h_{t-1}
= h_t - Δ_t u_t B_t (no second scan for h_{t-1}):

    dΔ_t = Σ_n g_t (A e_t + u_t B_t),   du_t = Σ_n g_t Δ_t B_t + gy_t D,   dB_t = Σ_d g_t Δ_t u_t,
    dC_t = Σ_d gy_t h_t,   dA = Σ_t g_t Δ_t e_t,   dh_0 = exp(Δ_0 A) g_0

where gy is the gradient reaching h_t C_t + D u_t (through the gate when z is given). Sums over d
(dB, dC) and over the batch (dA, dD) are per-program partials summed on the host: deterministic.

Causal conv: y_t = silu(bias + Σ_k w_k x_{t-K+1+k}), with the K-1 inputs before t = 0 taken from
`pre`. Backward: one kernel recomputes the pre-activation, writes its gradient ga and per-block
partials of dw and dbias; a second gathers dx_j = Σ_k w_k ga_{j+K-1-k} for x and `pre`.

Arithmetic in float32 whatever the storage dtype. Registered as torch.library custom ops.
Axis glossary: B batch, T time, D channels, N state size, K conv width; BT/BD/BN tile sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from titanforge.kernels.dispatch import interpreting


@triton.jit
def _first_order_combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def selective_scan_fwd_kernel(U, DELTA, A, Bm, Cm, Dv, Z, H0, Y, HCK, HT, T, D, N,
                              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr,
                              BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    o_n = tl.arange(0, BN)
    m_d, m_n = o_d < D, o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]
    b_A = tl.load(A + o_dn, mask=m_dn, other=0.).to(tl.float32)  # [BD, BN]
    if HAS_H0:
        b_h = tl.load(H0 + i_b * D * N + o_dn, mask=m_dn, other=0.).to(tl.float32)
    else:
        b_h = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_D:
        b_D = tl.load(Dv + o_d, mask=m_d, other=0.).to(tl.float32)
    n_t = tl.cdiv(T, BT)
    for i_t in range(0, n_t):
        tl.store(HCK + ((i_b * n_t + i_t) * D).to(tl.int64) * N + o_dn, b_h, mask=m_dn)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        m_td = m_t[:, None] & m_d[None, :]
        o_td = (i_b * T + o_t[:, None]).to(tl.int64) * D + o_d[None, :]
        o_tn = (i_b * T + o_t[:, None]).to(tl.int64) * N + o_n[None, :]
        m_tn = m_t[:, None] & m_n[None, :]
        b_dt = tl.load(DELTA + o_td, mask=m_td, other=0.).to(tl.float32)
        b_u = tl.load(U + o_td, mask=m_td, other=0.).to(tl.float32)
        b_B = tl.load(Bm + o_tn, mask=m_tn, other=0.).to(tl.float32)
        b_C = tl.load(Cm + o_tn, mask=m_tn, other=0.).to(tl.float32)
        # Padded steps have Δ = 0: decay 1, no input, so the state passes through them unchanged.
        b_a = tl.exp(b_dt[:, :, None] * b_A[None, :, :])  # [BT, BD, BN]
        b_x = (b_dt * b_u)[:, :, None] * b_B[:, None, :]
        b_pa, b_px = tl.associative_scan((b_a, b_x), 0, _first_order_combine)
        b_hs = b_px + b_pa * b_h[None, :, :]
        b_y = tl.sum(b_hs * b_C[:, None, :], axis=2)  # [BT, BD]
        if HAS_D:
            b_y += b_u * b_D[None, :]
        if HAS_Z:
            b_z = tl.load(Z + o_td, mask=m_td, other=0.).to(tl.float32)
            b_y *= b_z * tl.sigmoid(b_z)
        tl.store(Y + o_td, b_y.to(Y.dtype.element_ty), mask=m_td)
        b_h = tl.sum(tl.where(tl.arange(0, BT)[:, None, None] == BT - 1, b_hs, 0.), axis=0)
    tl.store(HT + i_b * D * N + o_dn, b_h, mask=m_dn)


@triton.jit
def selective_scan_bwd_kernel(U, DELTA, A, Bm, Cm, Dv, Z, HCK, DY, DHT, DU, DDELTA, DA, DB, DC, DDv, DZ, DH0,
                              B, T, D, N, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DHT: tl.constexpr,
                              BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    o_n = tl.arange(0, BN)
    m_d, m_n = o_d < D, o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]
    b_A = tl.load(A + o_dn, mask=m_dn, other=0.).to(tl.float32)
    if HAS_D:
        b_D = tl.load(Dv + o_d, mask=m_d, other=0.).to(tl.float32)
    if HAS_DHT:
        b_g = tl.load(DHT + i_b * D * N + o_dn, mask=m_dn, other=0.).to(tl.float32)
    else:
        b_g = tl.zeros([BD, BN], dtype=tl.float32)
    b_dA = tl.zeros([BD, BN], dtype=tl.float32)
    b_dD = tl.zeros([BD], dtype=tl.float32)
    n_t = tl.cdiv(T, BT)
    # Partial dB / dC of this program's channels: [n_d_blocks, B, T, N].
    o_part = (i_d * B + i_b).to(tl.int64) * T * N
    for j in range(0, n_t):
        i_t = n_t - 1 - j
        b_h = tl.load(HCK + ((i_b * n_t + i_t) * D).to(tl.int64) * N + o_dn, mask=m_dn, other=0.)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        m_td = m_t[:, None] & m_d[None, :]
        m_tn = m_t[:, None] & m_n[None, :]
        o_td = (i_b * T + o_t[:, None]).to(tl.int64) * D + o_d[None, :]
        o_tn = (i_b * T + o_t[:, None]).to(tl.int64) * N + o_n[None, :]
        b_dt = tl.load(DELTA + o_td, mask=m_td, other=0.).to(tl.float32)
        b_u = tl.load(U + o_td, mask=m_td, other=0.).to(tl.float32)
        b_B = tl.load(Bm + o_tn, mask=m_tn, other=0.).to(tl.float32)
        b_C = tl.load(Cm + o_tn, mask=m_tn, other=0.).to(tl.float32)
        b_dy = tl.load(DY + o_td, mask=m_td, other=0.).to(tl.float32)
        b_a = tl.exp(b_dt[:, :, None] * b_A[None, :, :])
        b_x = (b_dt * b_u)[:, :, None] * b_B[:, None, :]
        b_pa, b_px = tl.associative_scan((b_a, b_x), 0, _first_order_combine)
        b_hs = b_px + b_pa * b_h[None, :, :]  # h_t, [BT, BD, BN]
        if HAS_Z:
            b_z = tl.load(Z + o_td, mask=m_td, other=0.).to(tl.float32)
            b_y = tl.sum(b_hs * b_C[:, None, :], axis=2)
            if HAS_D:
                b_y += b_u * b_D[None, :]
            b_sz = tl.sigmoid(b_z)
            tl.store(DZ + o_td, (b_dy * b_y * b_sz * (1 + b_z * (1 - b_sz))).to(DZ.dtype.element_ty), mask=m_td)
            b_dy = b_dy * b_z * b_sz
        tl.store(DC + o_part + o_tn - i_b * T * N, tl.sum(b_dy[:, :, None] * b_hs, axis=1), mask=m_tn)
        # The adjoint g_t = exp(Δ_{t+1} A) g_{t+1} + gy_t C_t, carried in from the later block.
        o_t1 = o_t + 1
        b_dt1 = tl.load(DELTA + (i_b * T + o_t1[:, None]).to(tl.int64) * D + o_d[None, :],
                        mask=(o_t1 < T)[:, None] & m_d[None, :], other=0.).to(tl.float32)
        b_a1 = tl.exp(b_dt1[:, :, None] * b_A[None, :, :])
        b_ga, b_gx = tl.associative_scan((b_a1, b_dy[:, :, None] * b_C[:, None, :]), 0, _first_order_combine,
                                         reverse=True)
        b_gh = b_gx + b_ga * b_g[None, :, :]
        b_e = b_hs - b_x  # exp(Δ_t A) h_{t-1}
        b_ddt = tl.sum(b_gh * (b_A[None, :, :] * b_e + b_u[:, :, None] * b_B[:, None, :]), axis=2)
        b_du = tl.sum(b_gh * b_B[:, None, :], axis=2) * b_dt
        if HAS_D:
            b_du += b_dy * b_D[None, :]
            b_dD += tl.sum(b_dy * b_u, axis=0)
        tl.store(DDELTA + o_td, b_ddt.to(DDELTA.dtype.element_ty), mask=m_td)
        tl.store(DU + o_td, b_du.to(DU.dtype.element_ty), mask=m_td)
        tl.store(DB + o_part + o_tn - i_b * T * N, tl.sum(b_gh * (b_dt * b_u)[:, :, None], axis=1), mask=m_tn)
        b_dA += tl.sum(b_gh * b_dt[:, :, None] * b_e, axis=0)
        b_g = tl.sum(tl.where(tl.arange(0, BT)[:, None, None] == 0, b_gh, 0.), axis=0)
    # dh_0 = exp(Δ_0 A) g_0 (the carry is now g at t = 0).
    b_dt0 = tl.load(DELTA + i_b.to(tl.int64) * T * D + o_d, mask=m_d, other=0.).to(tl.float32)
    tl.store(DH0 + i_b * D * N + o_dn, tl.exp(b_dt0[:, None] * b_A) * b_g, mask=m_dn)
    tl.store(DA + i_b * D * N + o_dn, b_dA, mask=m_dn)
    if HAS_D:
        tl.store(DDv + i_b * D + o_d, b_dD, mask=m_d)


# Time block of the scan under the interpreter (tests lower it to cross block boundaries cheaply).
INTERPRETER_BT = 64


def _scan_blocks(T: int, D: int, N: int) -> tuple[int, int, int]:
    BN = triton.next_power_of_2(N)
    if interpreting():  # few, large programs: the interpreter pays per program and per loop step
        return min(INTERPRETER_BT, triton.next_power_of_2(T)), min(64, triton.next_power_of_2(D)), BN
    return 16, max(1, min(32, 2048 // (16 * BN))), BN


@torch.library.custom_op("titanforge::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None, z: torch.Tensor | None, h0: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u, delta, z [B, T, D], A [D, N], B, C [B, T, N], D [D], h0 [B, D, N] (contiguous) ->
    (y [B, T, D], final state [B, D, N] float32, block-start checkpoints [B, T/BT, D, N] float32)."""
    Bsz, T, Dn = u.shape
    N = A.shape[1]
    BT, BD, BN = _scan_blocks(T, Dn, N)
    y = torch.empty_like(u)
    hck = torch.empty(Bsz, triton.cdiv(T, BT), Dn, N, device=u.device, dtype=torch.float32)
    ht = torch.empty(Bsz, Dn, N, device=u.device, dtype=torch.float32)
    selective_scan_fwd_kernel[(Bsz, triton.cdiv(Dn, BD))](
        u, delta, A, B, C, D, z, h0, y, hck, ht, T, Dn, N, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_H0=h0 is not None, BT=BT, BD=BD, BN=BN)
    return y, ht, hck


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, h0):
    Bsz, T, Dn = u.shape
    N = A.shape[1]
    BT = _scan_blocks(T, Dn, N)[0]
    f32 = dict(device=u.device, dtype=torch.float32)
    return torch.empty_like(u), torch.empty(Bsz, Dn, N, **f32), torch.empty(Bsz, triton.cdiv(T, BT), Dn, N, **f32)


@torch.library.custom_op("titanforge::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None, z: torch.Tensor | None, hck: torch.Tensor, dy: torch.Tensor,
                       dht: torch.Tensor | None) -> list[torch.Tensor]:
    """-> [du, ddelta, dA, dB, dC, dD (empty without D), dz (empty without z), dh0 float32]."""
    Bsz, T, Dn = u.shape
    N = A.shape[1]
    BT, BD, BN = _scan_blocks(T, Dn, N)
    n_d = triton.cdiv(Dn, BD)
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(u) if z is not None else u.new_empty(0)
    dA = torch.empty(Bsz, Dn, N, **f32)
    dB, dC = torch.empty(n_d, Bsz, T, N, **f32), torch.empty(n_d, Bsz, T, N, **f32)
    dD = torch.empty(Bsz, Dn, **f32)
    dh0 = torch.empty(Bsz, Dn, N, **f32)
    selective_scan_bwd_kernel[(Bsz, n_d)](
        u, delta, A, B, C, D, z, hck, dy, dht, du, ddelta, dA, dB, dC, dD, dz, dh0, Bsz, T, Dn, N,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DHT=dht is not None, BT=BT, BD=BD, BN=BN)
    return [du, ddelta, dA.sum(0), dB.sum(0), dC.sum(0), dD.sum(0) if D is not None else u.new_empty(0), dz, dh0]


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, hck, dy, dht):
    Bsz, T, Dn = u.shape
    N = A.shape[1]
    f32 = dict(device=u.device, dtype=torch.float32)
    return [torch.empty_like(u), torch.empty_like(delta), torch.empty(Dn, N, **f32), torch.empty(Bsz, T, N, **f32),
            torch.empty(Bsz, T, N, **f32), torch.empty(Dn, **f32) if D is not None else u.new_empty(0),
            torch.empty_like(u) if z is not None else u.new_empty(0), torch.empty(Bsz, Dn, N, **f32)]


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, h0 = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, output[2])
    ctx.has = (D is not None, z is not None, h0 is not None)
    ctx.dtypes = [t.dtype if t is not None else None for t in (A, B, C, D, h0)]


def _scan_backward(ctx, dy, dht, dhck):
    u, delta, A, B, C, D, z, hck = ctx.saved_tensors
    has_D, has_z, has_h0 = ctx.has
    du, ddelta, dA, dB, dC, dD, dz, dh0 = selective_scan_bwd(u, delta, A, B, C, D, z, hck, dy.contiguous(),
                                                             None if dht is None else dht.contiguous())
    tA, tB, tC, tD, th0 = ctx.dtypes
    return (du, ddelta, dA.to(tA), dB.to(tB), dC.to(tC), dD.to(tD) if has_D else None, dz if has_z else None,
            dh0.to(th0) if has_h0 else None)


selective_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, initial_state=None):
    """y [B, T, D] in u's dtype and the final state [B, D, N] (float32); shapes as in
    chunk_selective_scan, checked by the caller."""
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    y, ht, _ = selective_scan_fwd(*(c(t) for t in (u, delta, A, B, C, D, z, initial_state)))
    return y, ht


@triton.jit
def causal_conv_fwd_kernel(X, PRE, W, BIAS, Y, T, D, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BT: tl.constexpr, BD: tl.constexpr):
    i_b, i_t, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_acc = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_BIAS:
        b_acc += tl.load(BIAS + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    for k in range(K):
        # Input index s = t - (K-1) + k: from x where s >= 0, from pre's row K-1+s before that.
        o_s = o_t - (K - 1) + k
        m_x = ((o_s >= 0) & (o_s < T))[:, None] & m_d[None, :]
        m_p = ((o_s < 0) & (o_t < T))[:, None] & m_d[None, :]
        b_in = tl.load(X + (i_b * T + o_s[:, None]).to(tl.int64) * D + o_d[None, :], mask=m_x, other=0.)
        b_in += tl.load(PRE + (i_b * (K - 1) + (K - 1) + o_s[:, None]).to(tl.int64) * D + o_d[None, :],
                        mask=m_p, other=0.)
        b_acc += b_in.to(tl.float32) * tl.load(W + k * D + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    m_td = (o_t < T)[:, None] & m_d[None, :]
    tl.store(Y + (i_b * T + o_t[:, None]).to(tl.int64) * D + o_d[None, :],
             (b_acc * tl.sigmoid(b_acc)).to(Y.dtype.element_ty), mask=m_td)


@triton.jit
def causal_conv_bwd_kernel_act(X, PRE, W, BIAS, DY, GA, DW, DBIAS, T, D, n_t, K: tl.constexpr,
                               HAS_BIAS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """ga = dy · silu'(pre-activation) into GA (float32), and this block's partial dw [K, D], dbias [D]."""
    i_b, i_t, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    m_td = (o_t < T)[:, None] & m_d[None, :]
    b_acc = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_BIAS:
        b_acc += tl.load(BIAS + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    for k in range(K):
        o_s = o_t - (K - 1) + k
        m_x = ((o_s >= 0) & (o_s < T))[:, None] & m_d[None, :]
        m_p = ((o_s < 0) & (o_t < T))[:, None] & m_d[None, :]
        b_in = tl.load(X + (i_b * T + o_s[:, None]).to(tl.int64) * D + o_d[None, :], mask=m_x, other=0.)
        b_in += tl.load(PRE + (i_b * (K - 1) + (K - 1) + o_s[:, None]).to(tl.int64) * D + o_d[None, :],
                        mask=m_p, other=0.)
        b_acc += b_in.to(tl.float32) * tl.load(W + k * D + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    o_td = (i_b * T + o_t[:, None]).to(tl.int64) * D + o_d[None, :]
    b_dy = tl.load(DY + o_td, mask=m_td, other=0.).to(tl.float32)
    b_sig = tl.sigmoid(b_acc)
    b_ga = b_dy * b_sig * (1 + b_acc * (1 - b_sig))
    tl.store(GA + o_td, b_ga, mask=m_td)
    o_part = (i_b * n_t + i_t).to(tl.int64)
    if HAS_BIAS:
        tl.store(DBIAS + o_part * D + o_d, tl.sum(b_ga, axis=0), mask=m_d)
    for k in range(K):
        o_s = o_t - (K - 1) + k
        m_x = ((o_s >= 0) & (o_s < T))[:, None] & m_d[None, :]
        m_p = ((o_s < 0) & (o_t < T))[:, None] & m_d[None, :]
        b_in = tl.load(X + (i_b * T + o_s[:, None]).to(tl.int64) * D + o_d[None, :], mask=m_x, other=0.)
        b_in += tl.load(PRE + (i_b * (K - 1) + (K - 1) + o_s[:, None]).to(tl.int64) * D + o_d[None, :],
                        mask=m_p, other=0.)
        tl.store(DW + (o_part * K + k) * D + o_d, tl.sum(b_ga * b_in.to(tl.float32), axis=0), mask=m_d)


@triton.jit
def causal_conv_bwd_kernel_input(GA, W, DX, DPRE, T, D, K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """d input s (s in [-(K-1), T)) = Σ_k w_k ga_{s+K-1-k}; s < 0 goes to DPRE's row K-1+s."""
    i_b, i_t, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_s = i_t * BT + tl.arange(0, BT) - (K - 1)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_acc = tl.zeros([BT, BD], dtype=tl.float32)
    for k in range(K):
        o_t = o_s + (K - 1) - k
        m = ((o_t >= 0) & (o_t < T))[:, None] & m_d[None, :]
        b_ga = tl.load(GA + (i_b * T + o_t[:, None]).to(tl.int64) * D + o_d[None, :], mask=m, other=0.)
        b_acc += b_ga * tl.load(W + k * D + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    m_x = ((o_s >= 0) & (o_s < T))[:, None] & m_d[None, :]
    tl.store(DX + (i_b * T + o_s[:, None]).to(tl.int64) * D + o_d[None, :], b_acc.to(DX.dtype.element_ty), mask=m_x)
    m_p = (o_s < 0)[:, None] & m_d[None, :]
    tl.store(DPRE + (i_b * (K - 1) + (K - 1) + o_s[:, None]).to(tl.int64) * D + o_d[None, :],
             b_acc.to(DPRE.dtype.element_ty), mask=m_p)


def _conv_blocks(T: int, D: int) -> tuple[int, int]:
    if interpreting():
        return min(128, triton.next_power_of_2(T)), min(128, triton.next_power_of_2(D))
    return 64, min(128, triton.next_power_of_2(D))


@torch.library.custom_op("titanforge::causal_conv_silu_fwd", mutates_args=())
def causal_conv_silu_fwd(x: torch.Tensor, pre: torch.Tensor, wT: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, D], pre [B, K-1, D], wT [K, D], bias [D] (contiguous) -> silu(conv) [B, T, D]."""
    Bsz, T, D = x.shape
    K = wT.shape[0]
    BT, BD = _conv_blocks(T, D)
    y = torch.empty_like(x)
    causal_conv_fwd_kernel[(Bsz, triton.cdiv(T, BT), triton.cdiv(D, BD))](
        x, pre, wT, bias, y, T, D, K=K, HAS_BIAS=bias is not None, BT=BT, BD=BD)
    return y


@causal_conv_silu_fwd.register_fake
def _(x, pre, wT, bias):
    return torch.empty_like(x)


@torch.library.custom_op("titanforge::causal_conv_silu_bwd", mutates_args=())
def causal_conv_silu_bwd(x: torch.Tensor, pre: torch.Tensor, wT: torch.Tensor, bias: torch.Tensor | None,
                         dy: torch.Tensor) -> list[torch.Tensor]:
    """-> [dx, dpre, dwT float32, dbias float32 (empty without a bias)]."""
    Bsz, T, D = x.shape
    K = wT.shape[0]
    BT, BD = _conv_blocks(T, D)
    n_t = triton.cdiv(T, BT)
    f32 = dict(device=x.device, dtype=torch.float32)
    ga = torch.empty(Bsz, T, D, **f32)
    dw = torch.empty(Bsz, n_t, K, D, **f32)
    db = torch.empty(Bsz, n_t, D, **f32) if bias is not None else None
    causal_conv_bwd_kernel_act[(Bsz, n_t, triton.cdiv(D, BD))](
        x, pre, wT, bias, dy, ga, dw, db, T, D, n_t, K=K, HAS_BIAS=bias is not None, BT=BT, BD=BD)
    dx, dpre = torch.empty_like(x), torch.empty_like(pre)
    causal_conv_bwd_kernel_input[(Bsz, triton.cdiv(T + K - 1, BT), triton.cdiv(D, BD))](
        ga, wT, dx, dpre, T, D, K=K, BT=BT, BD=BD)
    return [dx, dpre, dw.sum((0, 1)), db.sum((0, 1)) if bias is not None else x.new_empty(0)]


@causal_conv_silu_bwd.register_fake
def _(x, pre, wT, bias, dy):
    f32 = dict(device=x.device, dtype=torch.float32)
    return [torch.empty_like(x), torch.empty_like(pre), torch.empty(wT.shape, **f32),
            torch.empty(x.shape[-1], **f32) if bias is not None else x.new_empty(0)]


def _conv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_backward(ctx, dy):
    x, pre, wT, bias = ctx.saved_tensors
    dx, dpre, dw, db = causal_conv_silu_bwd(x, pre, wT, bias, dy.contiguous())
    return dx, dpre, dw.to(wT.dtype), db.to(bias.dtype) if bias is not None else None


causal_conv_silu_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


def causal_conv_silu_triton(x: torch.Tensor, pre: torch.Tensor, wT: torch.Tensor, bias: torch.Tensor | None):
    """silu(causal depthwise conv) [B, T, D] of x [B, T, D] after the inputs pre [B, K-1, D]; wT [K, D]."""
    return causal_conv_silu_fwd(x.contiguous(), pre.contiguous(), wT.contiguous(),
                                None if bias is None else bias.contiguous())


@triton.jit
def ssd_fwd_kernel(X, DT, A, Bm, Cm, Dv, H0, Y, SCK, ST, T, H, G, P, N,
                   HAS_D: tl.constexpr, HAS_H0: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """Mamba-2 SSD, one program per (batch row, head) carrying the state S [N, P] across chunks of BL."""
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    i_g = i_h // (H // G)
    o_l, o_p, o_n = tl.arange(0, BL), tl.arange(0, BP), tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    m_np = m_n[:, None] & m_p[None, :]
    o_s = (i_b * H + i_h).to(tl.int64)
    # The state's [P, N] layout in memory, held as S [N, P] on chip.
    o_np = o_p[None, :] * N + o_n[:, None]
    if HAS_H0:
        b_S = tl.load(H0 + o_s * P * N + o_np, mask=m_np, other=0.).to(tl.float32)
    else:
        b_S = tl.zeros([BN, BP], dtype=tl.float32)
    b_A = tl.load(A + i_h).to(tl.float32)
    if HAS_D:
        b_D = tl.load(Dv + i_h).to(tl.float32)
    m_tril = o_l[:, None] >= o_l[None, :]
    n_c = tl.cdiv(T, BL)
    for i_c in range(0, n_c):
        tl.store(SCK + (o_s * n_c + i_c) * P * N + o_np, b_S, mask=m_np)
        o_t = i_c * BL + o_l
        m_t = o_t < T
        o_x = ((i_b * T + o_t[:, None]).to(tl.int64) * H + i_h) * P + o_p[None, :]
        m_x = m_t[:, None] & m_p[None, :]
        o_bc = ((i_b * T + o_t[:, None]).to(tl.int64) * G + i_g) * N + o_n[None, :]
        m_bc = m_t[:, None] & m_n[None, :]
        b_x = tl.load(X + o_x, mask=m_x, other=0.).to(tl.float32)
        b_dt = tl.load(DT + (i_b * T + o_t).to(tl.int64) * H + i_h, mask=m_t, other=0.).to(tl.float32)
        b_B = tl.load(Bm + o_bc, mask=m_bc, other=0.).to(tl.float32)
        b_C = tl.load(Cm + o_bc, mask=m_bc, other=0.).to(tl.float32)
        b_cum = tl.cumsum(b_dt * b_A, axis=0)
        b_Xd = b_x * b_dt[:, None]
        b_L = tl.exp(tl.where(m_tril, b_cum[:, None] - b_cum[None, :], float("-inf")))
        b_M = tl.dot(b_C, tl.trans(b_B), input_precision="ieee") * b_L
        b_y = tl.dot(b_M, b_Xd, input_precision="ieee") + tl.dot(b_C * tl.exp(b_cum)[:, None], b_S,
                                                                 input_precision="ieee")
        if HAS_D:
            b_y += b_D * b_x
        tl.store(Y + o_x, b_y.to(Y.dtype.element_ty), mask=m_x)
        b_last = tl.sum(tl.where(o_l == BL - 1, b_cum, 0.), axis=0)
        b_w = tl.exp(b_last - b_cum)
        b_S = tl.exp(b_last) * b_S + tl.dot(tl.trans(b_B * b_w[:, None]), b_Xd, input_precision="ieee")
    tl.store(ST + o_s * P * N + o_np, b_S, mask=m_np)


@triton.jit
def ssd_bwd_kernel(X, DT, A, Bm, Cm, Dv, SCK, DY, DST, DX, DDT, DA, DB, DC, DDv, DH0, T, H, G, P, N,
                   HAS_D: tl.constexpr, HAS_DST: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr,
                   BN: tl.constexpr):
    """Reverse walk over the chunks with dS [N, P] on chip; dB, dC per head (summed over a group's
    heads on the host), dA, dD per (batch row, head)."""
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    i_g = i_h // (H // G)
    o_l, o_p, o_n = tl.arange(0, BL), tl.arange(0, BP), tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    m_np = m_n[:, None] & m_p[None, :]
    o_s = (i_b * H + i_h).to(tl.int64)
    o_np = o_p[None, :] * N + o_n[:, None]
    if HAS_DST:
        b_dS = tl.load(DST + o_s * P * N + o_np, mask=m_np, other=0.).to(tl.float32)
    else:
        b_dS = tl.zeros([BN, BP], dtype=tl.float32)
    b_A = tl.load(A + i_h).to(tl.float32)
    if HAS_D:
        b_D = tl.load(Dv + i_h).to(tl.float32)
    b_dA = tl.zeros([BL], dtype=tl.float32)
    b_dD = tl.zeros([BP], dtype=tl.float32)
    m_tril = o_l[:, None] >= o_l[None, :]
    n_c = tl.cdiv(T, BL)
    for j in range(0, n_c):
        i_c = n_c - 1 - j
        b_S = tl.load(SCK + (o_s * n_c + i_c) * P * N + o_np, mask=m_np, other=0.)
        o_t = i_c * BL + o_l
        m_t = o_t < T
        o_x = ((i_b * T + o_t[:, None]).to(tl.int64) * H + i_h) * P + o_p[None, :]
        m_x = m_t[:, None] & m_p[None, :]
        o_bc = ((i_b * T + o_t[:, None]).to(tl.int64) * G + i_g) * N + o_n[None, :]
        m_bc = m_t[:, None] & m_n[None, :]
        b_x = tl.load(X + o_x, mask=m_x, other=0.).to(tl.float32)
        b_dt = tl.load(DT + (i_b * T + o_t).to(tl.int64) * H + i_h, mask=m_t, other=0.).to(tl.float32)
        b_B = tl.load(Bm + o_bc, mask=m_bc, other=0.).to(tl.float32)
        b_C = tl.load(Cm + o_bc, mask=m_bc, other=0.).to(tl.float32)
        b_dy = tl.load(DY + o_x, mask=m_x, other=0.).to(tl.float32)
        b_cum = tl.cumsum(b_dt * b_A, axis=0)
        b_Xd = b_x * b_dt[:, None]
        b_L = tl.exp(tl.where(m_tril, b_cum[:, None] - b_cum[None, :], float("-inf")))
        b_CB = tl.dot(b_C, tl.trans(b_B), input_precision="ieee")
        b_M = b_CB * b_L
        b_ecum = tl.exp(b_cum)
        b_last = tl.sum(tl.where(o_l == BL - 1, b_cum, 0.), axis=0)
        b_w = tl.exp(b_last - b_cum)
        # y = (CBᵀ ⊙ L) Xd + (C ⊙ e^cum) S + D x
        b_dXd = tl.dot(tl.trans(b_M), b_dy, input_precision="ieee")
        b_dM = tl.where(m_tril, tl.dot(b_dy, tl.trans(b_Xd), input_precision="ieee"), 0.)
        b_dCB = b_dM * b_L
        b_dLL = b_dM * b_CB * b_L  # dL ⊙ L: the gradient of cum_i - cum_j
        b_dC = tl.dot(b_dCB, b_B, input_precision="ieee")
        b_dB = tl.dot(tl.trans(b_dCB), b_C, input_precision="ieee")
        b_dCe = tl.dot(b_dy, tl.trans(b_S), input_precision="ieee")
        b_dS_prev = tl.dot(tl.trans(b_C * b_ecum[:, None]), b_dy, input_precision="ieee")
        b_dC += b_dCe * b_ecum[:, None]
        b_dcum = tl.sum(b_dCe * b_C, axis=1) * b_ecum + tl.sum(b_dLL, axis=1) - tl.sum(b_dLL, axis=0)
        b_dx = tl.zeros([BL, BP], dtype=tl.float32)
        if HAS_D:
            b_dx += b_dy * b_D
            b_dD += tl.sum(b_dy * b_x, axis=0)
        # S' = e^last S + (B ⊙ w)ᵀ Xd
        b_dBw = tl.dot(b_Xd, tl.trans(b_dS), input_precision="ieee")
        b_dXd += tl.dot(b_B * b_w[:, None], b_dS, input_precision="ieee")
        b_dB += b_dBw * b_w[:, None]
        b_dww = tl.sum(b_dBw * b_B, axis=1) * b_w
        b_dlast = tl.sum(b_dww, axis=0) + tl.sum(tl.sum(b_dS * b_S, axis=1), axis=0) * tl.exp(b_last)
        b_dcum += tl.where(o_l == BL - 1, b_dlast, 0.) - b_dww
        b_dS = b_dS_prev + tl.exp(b_last) * b_dS
        # cum = cumsum(dt A): da_i = Σ_{k >= i} dcum_k
        b_da = tl.sum(tl.where(o_l[None, :] >= o_l[:, None], b_dcum[None, :], 0.), axis=1)
        b_ddt = b_da * b_A + tl.sum(b_dXd * b_x, axis=1)
        b_dA += b_da * b_dt
        b_dx += b_dXd * b_dt[:, None]
        tl.store(DX + o_x, b_dx.to(DX.dtype.element_ty), mask=m_x)
        tl.store(DDT + (i_b * T + o_t).to(tl.int64) * H + i_h, b_ddt.to(DDT.dtype.element_ty), mask=m_t)
        o_bh = ((i_b * T + o_t[:, None]).to(tl.int64) * H + i_h) * N + o_n[None, :]
        tl.store(DB + o_bh, b_dB, mask=m_bc)
        tl.store(DC + o_bh, b_dC, mask=m_bc)
    tl.store(DH0 + o_s * P * N + o_np, b_dS, mask=m_np)
    tl.store(DA + o_s, tl.sum(b_dA, axis=0))
    if HAS_D:
        tl.store(DDv + o_s, tl.sum(b_dD, axis=0))


def _ssd_tiles(P: int, N: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(P)), max(16, triton.next_power_of_2(N))


@torch.library.custom_op("titanforge::ssd_fwd", mutates_args=())
def ssd_fwd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: torch.Tensor | None, h0: torch.Tensor | None, chunk: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, T, H, P], dt [B, T, H], A [H], B, C [B, T, G, N], D [H], h0 [B, H, P, N] (contiguous) ->
    (y, final state [B, H, P, N] float32, chunk-start states [B, H, T/chunk, P, N] float32)."""
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    BP, BN = _ssd_tiles(P, N)
    f32 = dict(device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)
    sck = torch.empty(Bsz, H, triton.cdiv(T, chunk), P, N, **f32)
    st = torch.empty(Bsz, H, P, N, **f32)
    ssd_fwd_kernel[(Bsz, H)](x, dt, A, B, C, D, h0, y, sck, st, T, H, G, P, N, HAS_D=D is not None,
                             HAS_H0=h0 is not None, BL=chunk, BP=BP, BN=BN)
    return y, st, sck


@ssd_fwd.register_fake
def _(x, dt, A, B, C, D, h0, chunk):
    Bsz, T, H, P = x.shape
    N = B.shape[3]
    f32 = dict(device=x.device, dtype=torch.float32)
    return (torch.empty_like(x), torch.empty(Bsz, H, P, N, **f32),
            torch.empty(Bsz, H, -(-T // chunk), P, N, **f32))


@torch.library.custom_op("titanforge::ssd_bwd", mutates_args=())
def ssd_bwd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: torch.Tensor | None, sck: torch.Tensor, dy: torch.Tensor, dst: torch.Tensor | None,
            chunk: int) -> list[torch.Tensor]:
    """-> [dx, ddt, dA [H], dB, dC [B, T, G, N], dD [H] (empty without D), dh0 [B, H, P, N]] (float32 params)."""
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    BP, BN = _ssd_tiles(P, N)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx, ddt = torch.empty_like(x), torch.empty_like(dt)
    dA, dD = torch.empty(Bsz, H, **f32), torch.empty(Bsz, H, **f32)
    dB, dC = torch.empty(Bsz, T, H, N, **f32), torch.empty(Bsz, T, H, N, **f32)
    dh0 = torch.empty(Bsz, H, P, N, **f32)
    ssd_bwd_kernel[(Bsz, H)](x, dt, A, B, C, D, sck, dy, dst, dx, ddt, dA, dB, dC, dD, dh0, T, H, G, P, N,
                             HAS_D=D is not None, HAS_DST=dst is not None, BL=chunk, BP=BP, BN=BN)
    per_group = lambda t: t.view(Bsz, T, G, H // G, N).sum(3)  # noqa: E731
    return [dx, ddt, dA.sum(0), per_group(dB), per_group(dC), dD.sum(0) if D is not None else x.new_empty(0), dh0]


@ssd_bwd.register_fake
def _(x, dt, A, B, C, D, sck, dy, dst, chunk):
    Bsz, T, H, P = x.shape
    f32 = dict(device=x.device, dtype=torch.float32)
    return [torch.empty_like(x), torch.empty_like(dt), torch.empty(H, **f32), torch.empty(B.shape, **f32),
            torch.empty(C.shape, **f32), torch.empty(H, **f32) if D is not None else x.new_empty(0),
            torch.empty(Bsz, H, P, B.shape[3], **f32)]


def _ssd_setup(ctx, inputs, output):
    x, dt, A, B, C, D, h0, chunk = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, output[2])
    ctx.chunk, ctx.has = chunk, (D is not None, h0 is not None)
    ctx.dtypes = [t.dtype if t is not None else None for t in (A, B, C, D, h0)]


def _ssd_backward(ctx, dy, dst, dsck):
    x, dt, A, B, C, D, sck = ctx.saved_tensors
    dx, ddt, dA, dB, dC, dD, dh0 = ssd_bwd(x, dt, A, B, C, D, sck, dy.contiguous(),
                                           None if dst is None else dst.contiguous(), ctx.chunk)
    tA, tB, tC, tD, th0 = ctx.dtypes
    has_D, has_h0 = ctx.has
    return (dx, ddt, dA.to(tA), dB.to(tB), dC.to(tC), dD.to(tD) if has_D else None,
            dh0.to(th0) if has_h0 else None, None)


ssd_fwd.register_autograd(_ssd_backward, setup_context=_ssd_setup)


def ssd_fits(x: torch.Tensor, chunk: int) -> bool:
    """A power-of-two chunk (>= 16 on a GPU: tl.dot's minimum) and head dim and state size <= 128."""
    min_chunk = 1 if x.device.type == "cpu" else 16
    return chunk >= min_chunk and chunk & (chunk - 1) == 0 and x.shape[-1] <= 128


def ssd_triton(x, dt, A, B, C, D=None, initial_state=None, chunk: int = 64):
    """y [B, T, H, P] in x's dtype and the final state [B, H, P, N] (float32); chunk_ssd's contract."""
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    y, st, _ = ssd_fwd(c(x), c(dt), c(A), c(B), c(C), c(D), c(initial_state), int(chunk))
    return y, st
