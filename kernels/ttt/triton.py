"""TTT-Linear's and TTT-MLP's dual forms (chunk.py's `_linear_step` / `_mlp_step` over all
mini-batches) as Triton kernels, forward and backward. TTT-Linear is described here; TTT-MLP
(`ttt_mlp_*`) applies the same scheme to both layers (README.md).

One program per (batch row, head) holds the inner state W [D, D], b [D] on chip across all
mini-batches of K tokens and runs, per mini-batch (E[i, j] = token_eta[i] eta_j for j <= i):

    Z = k W + b,   G = LN-l2-grad(Z, v - k),   A = E ⊙ (q kᵀ + 1)
    Z̄ = q W + b - A G,   W ← W - (e ⊙ k)ᵀ G,   b ← b - eᵀ G      (e = E's last row)

and writes Z̄ (the caller adds q + LN(Z̄)) and the state at every mini-batch start (the checkpoint
the backward restarts from). G = rstd · P(gh) with gh = (γ x̂ + β - (v - k)) γ and P the projection
off span{1, x̂}: P(g) = g - mean(g) - x̂ mean(g x̂).

The backward walks the mini-batches in reverse with the state's gradient (dW, db) on chip,
recomputes the forward quantities from the checkpoint and applies, in this order,
    Z̄:     dq = dZ̄ Wᵀ, dW += qᵀ dZ̄, db += Σ dZ̄, dA = -tril(dZ̄ Gᵀ), dG = -Aᵀ dZ̄
    state: dG -= (e ⊙ k) dW' + e db'ᵀ,  d(e ⊙ k) = -G dW'ᵀ,  de = -G db'
    A:     dE = dA ⊙ (q kᵀ + 1), dS = dA ⊙ E -> dq += dS k, dk += dSᵀ q; dη, dtoken_eta from dE, de
    G:     u = rstd dG, dgh = P(u), drstd = Σ dG P(gh), dx̂ = γ² dgh - (u <gh, x̂> + gh <u, x̂>)/D,
           dγ += dgh (2γ x̂ + β - v + k), dβ += dgh γ, d(v - k) = -dgh γ,
           dZ = rstd P(dx̂) - drstd rstd² x̂ / D  -> dk += dZ Wᵀ, dW += kᵀ dZ, db += Σ dZ
(README.md derives the same identities). Arithmetic in float32 (`tl.dot` in IEEE float32).

Axis glossary: B batch, T time, H heads, D head dim (BD its power-of-two tile), K mini-batch size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _proj(g, xh, m_d, D):
    """P(g) = g - mean(g) - x̂ mean(g x̂) row-wise over the D valid columns (zero elsewhere)."""
    mg = tl.sum(g, axis=1) / D
    mgx = tl.sum(g * xh, axis=1) / D
    return tl.where(m_d[None, :], g - mg[:, None] - xh * mgx[:, None], 0.)


@triton.jit
def _minibatch(Q, Kp, V, ETA, TE, b_gamma, b_beta, i_b, i_h, i_n, T, H, D, eps,
               KB: tl.constexpr, BD: tl.constexpr):
    """Loads of one mini-batch and the forward quantities both kernels need."""
    o_i = tl.arange(0, KB)
    o_t = i_n * KB + o_i
    o_d = tl.arange(0, BD)
    m_t, m_d = o_t < T, o_d < D
    m = m_t[:, None] & m_d[None, :]
    o_x = ((i_b * T + o_t[:, None]).to(tl.int64) * H + i_h) * D + o_d[None, :]
    b_q = tl.load(Q + o_x, mask=m, other=0.).to(tl.float32)
    b_k = tl.load(Kp + o_x, mask=m, other=0.).to(tl.float32)
    b_v = tl.load(V + o_x, mask=m, other=0.).to(tl.float32)
    b_eta = tl.load(ETA + (i_b * T + o_t).to(tl.int64) * H + i_h, mask=m_t, other=0.).to(tl.float32)
    b_te = tl.load(TE + o_i, mask=m_t, other=0.).to(tl.float32)
    # The last token of this mini-batch (r - 1 where a ragged last one holds r < K tokens).
    i_last = tl.minimum(KB, T - i_n * KB) - 1
    b_te_last = tl.sum(tl.where(o_i == i_last, b_te, 0.), axis=0)
    b_e = b_te_last * b_eta  # [KB] E's last row
    b_E = tl.where(o_i[:, None] >= o_i[None, :], b_te[:, None] * b_eta[None, :], 0.)
    b_S = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    return o_i, o_d, m, m_d, o_x, b_q, b_k, b_v, b_eta, b_te, i_last, b_te_last, b_e, b_E, b_S


@triton.jit
def _ln_l2_grad(b_Z, b_target, b_gamma, b_beta, m_d, D, eps):
    """(x̂, rstd, gh, G) of the inner loss 1/2 ||LN(Z) - target||² at Z."""
    mu = tl.sum(tl.where(m_d[None, :], b_Z, 0.), axis=1) / D
    xc = tl.where(m_d[None, :], b_Z - mu[:, None], 0.)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    xh = xc * rstd[:, None]
    gh = (b_gamma[None, :] * xh + b_beta[None, :] - b_target) * b_gamma[None, :]
    G = _proj(gh, xh, m_d, D) * rstd[:, None]
    return xh, rstd, gh, G


@triton.jit
def ttt_linear_fwd_kernel(Q, Kp, V, ETA, TE, GAMMA, BETA, W0, B0, ZB, WCK, BCK, WT, BT_, T, H, D, eps,
                          KB: tl.constexpr, BD: tl.constexpr):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_dd = m_d[:, None] & m_d[None, :]
    o_dd = o_d[:, None] * D + o_d[None, :]
    o_s = (i_b * H + i_h).to(tl.int64)
    b_W = tl.load(W0 + o_s * D * D + o_dd, mask=m_dd, other=0.).to(tl.float32)
    b_b = tl.load(B0 + o_s * D + o_d, mask=m_d, other=0.).to(tl.float32)
    b_gamma = tl.load(GAMMA + i_h * D + o_d, mask=m_d, other=0.).to(tl.float32)
    b_beta = tl.load(BETA + i_h * D + o_d, mask=m_d, other=0.).to(tl.float32)
    n_mb = tl.cdiv(T, KB)
    for i_n in range(0, n_mb):
        o_ck = o_s * n_mb + i_n
        tl.store(WCK + o_ck * D * D + o_dd, b_W, mask=m_dd)
        tl.store(BCK + o_ck * D + o_d, b_b, mask=m_d)
        o_i, o_d, m, m_d, o_x, b_q, b_k, b_v, b_eta, b_te, i_last, b_te_last, b_e, b_E, b_S = _minibatch(
            Q, Kp, V, ETA, TE, b_gamma, b_beta, i_b, i_h, i_n, T, H, D, eps, KB, BD)
        b_Z = tl.dot(b_k, b_W, input_precision="ieee") + b_b[None, :]
        xh, rstd, gh, b_G = _ln_l2_grad(b_Z, b_v - b_k, b_gamma, b_beta, m_d, D, eps)
        b_A = b_E * (b_S + 1.)
        b_Zb = tl.dot(b_q, b_W, input_precision="ieee") + b_b[None, :] - tl.dot(b_A, b_G, input_precision="ieee")
        tl.store(ZB + o_x, b_Zb.to(ZB.dtype.element_ty), mask=m)
        b_W -= tl.dot(tl.trans(b_k * b_e[:, None]), b_G, input_precision="ieee")
        b_b -= tl.sum(b_e[:, None] * b_G, axis=0)
    tl.store(WT + o_s * D * D + o_dd, b_W, mask=m_dd)
    tl.store(BT_ + o_s * D + o_d, b_b, mask=m_d)


@triton.jit
def ttt_linear_bwd_kernel(Q, Kp, V, ETA, TE, GAMMA, BETA, WCK, BCK, DZB, DWT, DBT, DQ, DK, DV, DETA, DTE, DGAMMA,
                          DBETA, DW0, DB0, T, H, D, eps, HAS_DWT: tl.constexpr, HAS_DBT: tl.constexpr,
                          KB: tl.constexpr, BD: tl.constexpr):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_dd = m_d[:, None] & m_d[None, :]
    o_dd = o_d[:, None] * D + o_d[None, :]
    o_s = (i_b * H + i_h).to(tl.int64)
    b_gamma = tl.load(GAMMA + i_h * D + o_d, mask=m_d, other=0.).to(tl.float32)
    b_beta = tl.load(BETA + i_h * D + o_d, mask=m_d, other=0.).to(tl.float32)
    if HAS_DWT:
        b_dW = tl.load(DWT + o_s * D * D + o_dd, mask=m_dd, other=0.).to(tl.float32)
    else:
        b_dW = tl.zeros([BD, BD], dtype=tl.float32)
    if HAS_DBT:
        b_db = tl.load(DBT + o_s * D + o_d, mask=m_d, other=0.).to(tl.float32)
    else:
        b_db = tl.zeros([BD], dtype=tl.float32)
    b_dgamma = tl.zeros([BD], dtype=tl.float32)
    b_dbeta = tl.zeros([BD], dtype=tl.float32)
    b_dte = tl.zeros([KB], dtype=tl.float32)
    n_mb = tl.cdiv(T, KB)
    for j in range(0, n_mb):
        i_n = n_mb - 1 - j
        o_ck = o_s * n_mb + i_n
        b_W = tl.load(WCK + o_ck * D * D + o_dd, mask=m_dd, other=0.)
        b_b = tl.load(BCK + o_ck * D + o_d, mask=m_d, other=0.)
        o_i, o_d, m, m_d, o_x, b_q, b_k, b_v, b_eta, b_te, i_last, b_te_last, b_e, b_E, b_S = _minibatch(
            Q, Kp, V, ETA, TE, b_gamma, b_beta, i_b, i_h, i_n, T, H, D, eps, KB, BD)
        b_Z = tl.dot(b_k, b_W, input_precision="ieee") + b_b[None, :]
        b_target = b_v - b_k
        xh, rstd, gh, b_G = _ln_l2_grad(b_Z, b_target, b_gamma, b_beta, m_d, D, eps)
        b_A = b_E * (b_S + 1.)
        b_dZb = tl.load(DZB + o_x, mask=m, other=0.).to(tl.float32)
        # Z̄ = q W + b - A G
        b_dq = tl.dot(b_dZb, tl.trans(b_W), input_precision="ieee")
        b_dWn = tl.dot(tl.trans(b_q), b_dZb, input_precision="ieee")
        b_dbn = tl.sum(b_dZb, axis=0)
        m_tril = o_i[:, None] >= o_i[None, :]
        b_dA = tl.where(m_tril, -tl.dot(b_dZb, tl.trans(b_G), input_precision="ieee"), 0.)
        b_dG = -tl.dot(tl.trans(b_A), b_dZb, input_precision="ieee")
        # W' = W - (e k)ᵀ G,  b' = b - eᵀ G  (b_dW, b_db hold dW', db')
        b_ke = b_k * b_e[:, None]
        b_dG -= tl.dot(b_ke, b_dW, input_precision="ieee") + b_e[:, None] * b_db[None, :]
        b_dke = -tl.dot(b_G, tl.trans(b_dW), input_precision="ieee")
        b_de = tl.sum(b_k * b_dke, axis=1) - tl.sum(b_G * b_db[None, :], axis=1)
        b_dk = b_e[:, None] * b_dke
        # A = E ⊙ (q kᵀ + 1)
        b_dE = b_dA * (b_S + 1.)
        b_dS = b_dA * b_E
        b_dq += tl.dot(b_dS, b_k, input_precision="ieee")
        b_dk += tl.dot(tl.trans(b_dS), b_q, input_precision="ieee")
        b_deta = tl.sum(b_dE * b_te[:, None], axis=0) + b_de * b_te_last
        b_dte += tl.sum(b_dE * b_eta[None, :], axis=1)
        b_dte += tl.where(o_i == i_last, tl.sum(b_de * b_eta, axis=0), 0.)
        # G = rstd · P(gh)
        u = b_dG * rstd[:, None]
        b_dgh = _proj(u, xh, m_d, D)
        b_drstd = tl.sum(b_dG * b_G, axis=1) / rstd
        b_dxh = b_gamma[None, :] * b_gamma[None, :] * b_dgh - (
            u * tl.sum(gh * xh, axis=1)[:, None] + gh * tl.sum(u * xh, axis=1)[:, None]) / D
        b_dgamma += tl.sum(b_dgh * (2 * b_gamma[None, :] * xh + b_beta[None, :] - b_target), axis=0)
        b_dbeta += tl.sum(b_dgh * b_gamma[None, :], axis=0)
        b_dtarget = -b_dgh * b_gamma[None, :]
        b_dZ = _proj(b_dxh, xh, m_d, D) * rstd[:, None] - (b_drstd * rstd * rstd)[:, None] * xh / D
        b_dZ = tl.where(m, b_dZ, 0.)
        b_dk += tl.dot(b_dZ, tl.trans(b_W), input_precision="ieee") - b_dtarget
        b_dWn += tl.dot(tl.trans(b_k), b_dZ, input_precision="ieee")
        b_dbn += tl.sum(b_dZ, axis=0)
        b_dW += b_dWn
        b_db += b_dbn
        tl.store(DQ + o_x, b_dq.to(DQ.dtype.element_ty), mask=m)
        tl.store(DK + o_x, b_dk.to(DK.dtype.element_ty), mask=m)
        tl.store(DV + o_x, b_dtarget.to(DV.dtype.element_ty), mask=m)
        tl.store(DETA + (i_b * T + i_n * KB + o_i).to(tl.int64) * H + i_h, b_deta.to(DETA.dtype.element_ty),
                 mask=i_n * KB + o_i < T)
    tl.store(DW0 + o_s * D * D + o_dd, b_dW, mask=m_dd)
    tl.store(DB0 + o_s * D + o_d, b_db, mask=m_d)
    tl.store(DTE + o_s * KB + tl.arange(0, KB), b_dte)
    tl.store(DGAMMA + o_s * D + o_d, b_dgamma, mask=m_d)
    tl.store(DBETA + o_s * D + o_d, b_dbeta, mask=m_d)


@triton.jit
def _gelu_parts(x):
    """(gelu(x), gelu'(x), gelu''(x)) of the tanh approximation (exact constants, as chunk.py)."""
    # c = sqrt(2 / pi), a = 0.044715; tanh(u) = 2 sigmoid(2u) - 1.
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = 2 * tl.sigmoid(2 * u) - 1
    du = 0.7978845608028654 * (1 + 3 * 0.044715 * x * x)
    g = 0.5 * x * (1 + t)
    g1 = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du
    g2 = (1 - t * t) * (du + 0.5 * x * (6 * 0.044715 * 0.7978845608028654 * x - 2 * t * du * du))
    return g, g1, g2


@triton.jit
def ttt_mlp_fwd_kernel(Q, Kp, V, ETA, TE, GAMMA, BETA, W10, B10, W20, B20, ZB, W1CK, B1CK, W2CK, B2CK,
                       W1T, B1T, W2T, B2T, T, H, D, F, eps, KB: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_d, o_f = tl.arange(0, BD), tl.arange(0, BF)
    m_d, m_f = o_d < D, o_f < F
    m_df, m_fd = m_d[:, None] & m_f[None, :], m_f[:, None] & m_d[None, :]
    o_df, o_fd = o_d[:, None] * F + o_f[None, :], o_f[:, None] * D + o_d[None, :]
    o_s = (i_b * H + i_h).to(tl.int64)
    b_W1 = tl.load(W10 + o_s * D * F + o_df, mask=m_df, other=0.).to(tl.float32)
    b_b1 = tl.load(B10 + o_s * F + o_f, mask=m_f, other=0.).to(tl.float32)
    b_W2 = tl.load(W20 + o_s * F * D + o_fd, mask=m_fd, other=0.).to(tl.float32)
    b_b2 = tl.load(B20 + o_s * D + o_d, mask=m_d, other=0.).to(tl.float32)
    b_gamma = tl.load(GAMMA + i_h * D + o_d, mask=m_d, other=0.).to(tl.float32)
    b_beta = tl.load(BETA + i_h * D + o_d, mask=m_d, other=0.).to(tl.float32)
    n_mb = tl.cdiv(T, KB)
    for i_n in range(0, n_mb):
        o_ck = o_s * n_mb + i_n
        tl.store(W1CK + o_ck * D * F + o_df, b_W1, mask=m_df)
        tl.store(B1CK + o_ck * F + o_f, b_b1, mask=m_f)
        tl.store(W2CK + o_ck * F * D + o_fd, b_W2, mask=m_fd)
        tl.store(B2CK + o_ck * D + o_d, b_b2, mask=m_d)
        o_i, o_d, m, m_d, o_x, b_q, b_k, b_v, b_eta, b_te, i_last, b_te_last, b_e, b_E, b_S = _minibatch(
            Q, Kp, V, ETA, TE, b_gamma, b_beta, i_b, i_h, i_n, T, H, D, eps, KB, BD)
        b_Z1 = tl.dot(b_k, b_W1, input_precision="ieee") + b_b1[None, :]
        b_X2, b_gp, _ = _gelu_parts(b_Z1)
        b_Z2 = tl.dot(b_X2, b_W2, input_precision="ieee") + b_b2[None, :]
        xh, rstd, gh, b_G2 = _ln_l2_grad(b_Z2, b_v - b_k, b_gamma, b_beta, m_d, D, eps)
        b_G1 = tl.dot(b_G2, tl.trans(b_W2), input_precision="ieee") * b_gp
        b_A = b_E * (b_S + 1.)
        b_Z1b = tl.dot(b_q, b_W1, input_precision="ieee") + b_b1[None, :] - tl.dot(b_A, b_G1, input_precision="ieee")
        b_X2b, _, _ = _gelu_parts(b_Z1b)
        b_B2 = b_E * (tl.dot(b_X2b, tl.trans(b_X2), input_precision="ieee") + 1.)
        b_Zb = tl.dot(b_X2b, b_W2, input_precision="ieee") + b_b2[None, :] - tl.dot(b_B2, b_G2,
                                                                                     input_precision="ieee")
        tl.store(ZB + o_x, b_Zb.to(ZB.dtype.element_ty), mask=m)
        b_W1 -= tl.dot(tl.trans(b_k * b_e[:, None]), b_G1, input_precision="ieee")
        b_b1 -= tl.sum(b_e[:, None] * b_G1, axis=0)
        b_W2 -= tl.dot(tl.trans(b_X2 * b_e[:, None]), b_G2, input_precision="ieee")
        b_b2 -= tl.sum(b_e[:, None] * b_G2, axis=0)
    tl.store(W1T + o_s * D * F + o_df, b_W1, mask=m_df)
    tl.store(B1T + o_s * F + o_f, b_b1, mask=m_f)
    tl.store(W2T + o_s * F * D + o_fd, b_W2, mask=m_fd)
    tl.store(B2T + o_s * D + o_d, b_b2, mask=m_d)


@triton.jit
def ttt_mlp_bwd_kernel(Q, Kp, V, ETA, TE, GAMMA, BETA, W1CK, B1CK, W2CK, B2CK, DZB, DW1T, DB1T, DW2T, DB2T,
                       DQ, DK, DV, DETA, DTE, DGAMMA, DBETA, DW10, DB10, DW20, DB20, T, H, D, F, eps,
                       HAS_DST: tl.constexpr, KB: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_d, o_f = tl.arange(0, BD), tl.arange(0, BF)
    m_d, m_f = o_d < D, o_f < F
    m_df, m_fd = m_d[:, None] & m_f[None, :], m_f[:, None] & m_d[None, :]
    o_df, o_fd = o_d[:, None] * F + o_f[None, :], o_f[:, None] * D + o_d[None, :]
    o_s = (i_b * H + i_h).to(tl.int64)
    b_gamma = tl.load(GAMMA + i_h * D + o_d, mask=m_d, other=0.).to(tl.float32)
    b_beta = tl.load(BETA + i_h * D + o_d, mask=m_d, other=0.).to(tl.float32)
    if HAS_DST:
        b_dW1 = tl.load(DW1T + o_s * D * F + o_df, mask=m_df, other=0.).to(tl.float32)
        b_db1 = tl.load(DB1T + o_s * F + o_f, mask=m_f, other=0.).to(tl.float32)
        b_dW2 = tl.load(DW2T + o_s * F * D + o_fd, mask=m_fd, other=0.).to(tl.float32)
        b_db2 = tl.load(DB2T + o_s * D + o_d, mask=m_d, other=0.).to(tl.float32)
    else:
        b_dW1 = tl.zeros([BD, BF], dtype=tl.float32)
        b_db1 = tl.zeros([BF], dtype=tl.float32)
        b_dW2 = tl.zeros([BF, BD], dtype=tl.float32)
        b_db2 = tl.zeros([BD], dtype=tl.float32)
    b_dgamma = tl.zeros([BD], dtype=tl.float32)
    b_dbeta = tl.zeros([BD], dtype=tl.float32)
    b_dte = tl.zeros([KB], dtype=tl.float32)
    n_mb = tl.cdiv(T, KB)
    for j in range(0, n_mb):
        i_n = n_mb - 1 - j
        o_ck = o_s * n_mb + i_n
        b_W1 = tl.load(W1CK + o_ck * D * F + o_df, mask=m_df, other=0.)
        b_b1 = tl.load(B1CK + o_ck * F + o_f, mask=m_f, other=0.)
        b_W2 = tl.load(W2CK + o_ck * F * D + o_fd, mask=m_fd, other=0.)
        b_b2 = tl.load(B2CK + o_ck * D + o_d, mask=m_d, other=0.)
        o_i, o_d, m, m_d, o_x, b_q, b_k, b_v, b_eta, b_te, i_last, b_te_last, b_e, b_E, b_S = _minibatch(
            Q, Kp, V, ETA, TE, b_gamma, b_beta, i_b, i_h, i_n, T, H, D, eps, KB, BD)
        m_tril = o_i[:, None] >= o_i[None, :]
        # Recompute the forward.
        b_Z1 = tl.dot(b_k, b_W1, input_precision="ieee") + b_b1[None, :]
        b_X2, b_gp, b_gpp = _gelu_parts(b_Z1)
        b_Z2 = tl.dot(b_X2, b_W2, input_precision="ieee") + b_b2[None, :]
        b_target = b_v - b_k
        xh, rstd, gh, b_G2 = _ln_l2_grad(b_Z2, b_target, b_gamma, b_beta, m_d, D, eps)
        b_Hm = tl.dot(b_G2, tl.trans(b_W2), input_precision="ieee")
        b_G1 = b_Hm * b_gp
        b_A = b_E * (b_S + 1.)
        b_Z1b = tl.dot(b_q, b_W1, input_precision="ieee") + b_b1[None, :] - tl.dot(b_A, b_G1, input_precision="ieee")
        b_X2b, b_gpb, _ = _gelu_parts(b_Z1b)
        b_M = tl.dot(b_X2b, tl.trans(b_X2), input_precision="ieee")
        b_B2 = b_E * (b_M + 1.)
        b_dZb = tl.load(DZB + o_x, mask=m, other=0.).to(tl.float32)
        # Z̄ = X2b W2 + b2 - B2 G2
        b_dX2b = tl.dot(b_dZb, tl.trans(b_W2), input_precision="ieee")
        b_dW2n = tl.dot(tl.trans(b_X2b), b_dZb, input_precision="ieee")
        b_db2n = tl.sum(b_dZb, axis=0)
        b_dB2 = tl.where(m_tril, -tl.dot(b_dZb, tl.trans(b_G2), input_precision="ieee"), 0.)
        b_dG2 = -tl.dot(tl.trans(b_B2), b_dZb, input_precision="ieee")
        b_dE = b_dB2 * (b_M + 1.)
        b_dM = b_dB2 * b_E
        b_dX2b += tl.dot(b_dM, b_X2, input_precision="ieee")
        b_dX2 = tl.dot(tl.trans(b_dM), b_X2b, input_precision="ieee")
        # X2b = gelu(Z1b);  Z1b = q W1 + b1 - A G1
        b_dZ1b = b_dX2b * b_gpb
        b_dq = tl.dot(b_dZ1b, tl.trans(b_W1), input_precision="ieee")
        b_dW1n = tl.dot(tl.trans(b_q), b_dZ1b, input_precision="ieee")
        b_db1n = tl.sum(b_dZ1b, axis=0)
        b_dA = tl.where(m_tril, -tl.dot(b_dZ1b, tl.trans(b_G1), input_precision="ieee"), 0.)
        b_dG1 = -tl.dot(tl.trans(b_A), b_dZ1b, input_precision="ieee")
        b_dE += b_dA * (b_S + 1.)
        b_dS = b_dA * b_E
        b_dq += tl.dot(b_dS, b_k, input_precision="ieee")
        b_dk = tl.dot(tl.trans(b_dS), b_q, input_precision="ieee")
        # State updates (b_dW1 .. b_db2 hold the gradients of the updated state).
        b_dG1 -= tl.dot(b_k * b_e[:, None], b_dW1, input_precision="ieee") + b_e[:, None] * b_db1[None, :]
        b_dke = -tl.dot(b_G1, tl.trans(b_dW1), input_precision="ieee")
        b_dk += b_e[:, None] * b_dke
        b_de = tl.sum(b_k * b_dke, axis=1) - tl.sum(b_G1 * b_db1[None, :], axis=1)
        b_dG2 -= tl.dot(b_X2 * b_e[:, None], b_dW2, input_precision="ieee") + b_e[:, None] * b_db2[None, :]
        b_dxe = -tl.dot(b_G2, tl.trans(b_dW2), input_precision="ieee")
        b_dX2 += b_e[:, None] * b_dxe
        b_de += tl.sum(b_X2 * b_dxe, axis=1) - tl.sum(b_G2 * b_db2[None, :], axis=1)
        b_deta = tl.sum(b_dE * b_te[:, None], axis=0) + b_de * b_te_last
        b_dte += tl.sum(b_dE * b_eta[None, :], axis=1)
        b_dte += tl.where(o_i == i_last, tl.sum(b_de * b_eta, axis=0), 0.)
        # G1 = (G2 W2ᵀ) ⊙ gelu'(Z1)
        b_dHm = b_dG1 * b_gp
        b_dZ1 = b_dG1 * b_Hm * b_gpp
        b_dG2 += tl.dot(b_dHm, b_W2, input_precision="ieee")
        b_dW2n += tl.dot(tl.trans(b_dHm), b_G2, input_precision="ieee")
        # G2 = rstd · P(gh) at Z2
        u = b_dG2 * rstd[:, None]
        b_dgh = _proj(u, xh, m_d, D)
        b_drstd = tl.sum(b_dG2 * b_G2, axis=1) / rstd
        b_dxh = b_gamma[None, :] * b_gamma[None, :] * b_dgh - (
            u * tl.sum(gh * xh, axis=1)[:, None] + gh * tl.sum(u * xh, axis=1)[:, None]) / D
        b_dgamma += tl.sum(b_dgh * (2 * b_gamma[None, :] * xh + b_beta[None, :] - b_target), axis=0)
        b_dbeta += tl.sum(b_dgh * b_gamma[None, :], axis=0)
        b_dtarget = -b_dgh * b_gamma[None, :]
        b_dZ2 = _proj(b_dxh, xh, m_d, D) * rstd[:, None] - (b_drstd * rstd * rstd)[:, None] * xh / D
        b_dZ2 = tl.where(m, b_dZ2, 0.)
        # Z2 = X2 W2 + b2;  X2 = gelu(Z1);  Z1 = k W1 + b1
        b_dX2 += tl.dot(b_dZ2, tl.trans(b_W2), input_precision="ieee")
        b_dW2n += tl.dot(tl.trans(b_X2), b_dZ2, input_precision="ieee")
        b_db2n += tl.sum(b_dZ2, axis=0)
        b_dZ1 += b_dX2 * b_gp
        b_dZ1 = tl.where((i_n * KB + o_i < T)[:, None], b_dZ1, 0.)
        b_dk += tl.dot(b_dZ1, tl.trans(b_W1), input_precision="ieee") - b_dtarget
        b_dW1n += tl.dot(tl.trans(b_k), b_dZ1, input_precision="ieee")
        b_db1n += tl.sum(b_dZ1, axis=0)
        b_dW1 += b_dW1n
        b_db1 += b_db1n
        b_dW2 += b_dW2n
        b_db2 += b_db2n
        tl.store(DQ + o_x, b_dq.to(DQ.dtype.element_ty), mask=m)
        tl.store(DK + o_x, b_dk.to(DK.dtype.element_ty), mask=m)
        tl.store(DV + o_x, b_dtarget.to(DV.dtype.element_ty), mask=m)
        tl.store(DETA + (i_b * T + i_n * KB + o_i).to(tl.int64) * H + i_h, b_deta.to(DETA.dtype.element_ty),
                 mask=i_n * KB + o_i < T)
    tl.store(DW10 + o_s * D * F + o_df, b_dW1, mask=m_df)
    tl.store(DB10 + o_s * F + o_f, b_db1, mask=m_f)
    tl.store(DW20 + o_s * F * D + o_fd, b_dW2, mask=m_fd)
    tl.store(DB20 + o_s * D + o_d, b_db2, mask=m_d)
    tl.store(DTE + o_s * KB + tl.arange(0, KB), b_dte)
    tl.store(DGAMMA + o_s * D + o_d, b_dgamma, mask=m_d)
    tl.store(DBETA + o_s * D + o_d, b_dbeta, mask=m_d)


def _tile(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


@torch.library.custom_op("titanforge::ttt_linear_fwd", mutates_args=())
def ttt_linear_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, token_eta: torch.Tensor,
                   gamma: torch.Tensor, beta: torch.Tensor, W0: torch.Tensor, b0: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, T, H, D], eta [B, T, H], token_eta [K], gamma, beta [H, D], W0 [B, H, D, D], b0 [B, H, D]
    (contiguous) -> [Z̄ [B, T, H, D], W_T, b_T (float32), W and b checkpoints [B, H, T/K, D(, D)]]."""
    B, T, H, D = q.shape
    KB = token_eta.shape[0]
    n_mb = triton.cdiv(T, KB)
    f32 = dict(device=q.device, dtype=torch.float32)
    zb = torch.empty_like(q)
    wck, bck = torch.empty(B, H, n_mb, D, D, **f32), torch.empty(B, H, n_mb, D, **f32)
    wt, bt = torch.empty(B, H, D, D, **f32), torch.empty(B, H, D, **f32)
    ttt_linear_fwd_kernel[(B, H)](q, k, v, eta, token_eta, gamma, beta, W0, b0, zb, wck, bck, wt, bt, T, H, D, eps,
                                  KB=KB, BD=_tile(D))
    return zb, wt, bt, wck, bck


@ttt_linear_fwd.register_fake
def _(q, k, v, eta, token_eta, gamma, beta, W0, b0, eps):
    B, T, H, D = q.shape
    n_mb = -(-T // token_eta.shape[0])
    f32 = dict(device=q.device, dtype=torch.float32)
    return (torch.empty_like(q), torch.empty(B, H, D, D, **f32), torch.empty(B, H, D, **f32),
            torch.empty(B, H, n_mb, D, D, **f32), torch.empty(B, H, n_mb, D, **f32))


@torch.library.custom_op("titanforge::ttt_linear_bwd", mutates_args=())
def ttt_linear_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, token_eta: torch.Tensor,
                   gamma: torch.Tensor, beta: torch.Tensor, wck: torch.Tensor, bck: torch.Tensor, dzb: torch.Tensor,
                   dwt: torch.Tensor | None, dbt: torch.Tensor | None, eps: float) -> list[torch.Tensor]:
    """-> [dq, dk, dv, deta, dtoken_eta [K], dgamma, dbeta [H, D], dW0, db0] (float32 for the parameters)."""
    B, T, H, D = q.shape
    KB = token_eta.shape[0]
    f32 = dict(device=q.device, dtype=torch.float32)
    dq, dk, dv, deta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(eta)
    dte = torch.empty(B, H, KB, **f32)
    dgamma, dbeta = torch.empty(B, H, D, **f32), torch.empty(B, H, D, **f32)
    dW0, db0 = torch.empty(B, H, D, D, **f32), torch.empty(B, H, D, **f32)
    ttt_linear_bwd_kernel[(B, H)](q, k, v, eta, token_eta, gamma, beta, wck, bck, dzb, dwt, dbt, dq, dk, dv, deta,
                                  dte, dgamma, dbeta, dW0, db0, T, H, D, eps, HAS_DWT=dwt is not None,
                                  HAS_DBT=dbt is not None, KB=KB, BD=_tile(D))
    return [dq, dk, dv, deta, dte.sum((0, 1)), dgamma.sum(0), dbeta.sum(0), dW0, db0]


@ttt_linear_bwd.register_fake
def _(q, k, v, eta, token_eta, gamma, beta, wck, bck, dzb, dwt, dbt, eps):
    B, T, H, D = q.shape
    f32 = dict(device=q.device, dtype=torch.float32)
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(eta),
            torch.empty(token_eta.shape, **f32), torch.empty(H, D, **f32), torch.empty(H, D, **f32),
            torch.empty(B, H, D, D, **f32), torch.empty(B, H, D, **f32)]


def _setup(ctx, inputs, output):
    q, k, v, eta, token_eta, gamma, beta, W0, b0, eps = inputs
    ctx.save_for_backward(q, k, v, eta, token_eta, gamma, beta, output[3], output[4])
    ctx.eps = eps
    ctx.dtypes = [t.dtype for t in (token_eta, gamma, beta, W0, b0)]


def _backward(ctx, dzb, dwt, dbt, dwck, dbck):
    q, k, v, eta, token_eta, gamma, beta, wck, bck = ctx.saved_tensors
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    dq, dk, dv, deta, dte, dgamma, dbeta, dW0, db0 = ttt_linear_bwd(q, k, v, eta, token_eta, gamma, beta, wck, bck,
                                                                    dzb.contiguous(), c(dwt), c(dbt), ctx.eps)
    t_te, t_g, t_b, t_W, t_b0 = ctx.dtypes
    return dq, dk, dv, deta, dte.to(t_te), dgamma.to(t_g), dbeta.to(t_b), dW0.to(t_W), db0.to(t_b0), None


ttt_linear_fwd.register_autograd(_backward, setup_context=_setup)


def fits(q: torch.Tensor, token_eta: torch.Tensor) -> bool:
    """Whether the kernels take this shape: a power-of-two mini-batch of at least 16 tokens on a GPU
    (any power of two in the interpreter) and a head dim of at most 128 (the state stays on chip)."""
    K = token_eta.shape[0]
    min_k = 1 if q.device.type == "cpu" else 16
    return K >= min_k and K & (K - 1) == 0 and q.shape[-1] <= 128


def ttt_linear_triton(q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state, eps: float = 1e-6):
    """(z [B, T, H, D], (W_T, b_T)): chunk_ttt_linear's contract (q + LN(Z̄) in PyTorch after the kernel)."""
    from titanforge.kernels.ttt.chunk import _ln_fwd

    W0, b0 = initial_state
    c = lambda t: t.contiguous()  # noqa: E731
    zb, wt, bt, _, _ = ttt_linear_fwd(c(q), c(k), c(v), c(eta), c(token_eta), c(ln_weight), c(ln_bias), c(W0), c(b0),
                                      float(eps))
    dtype = torch.promote_types(q.dtype, torch.float32)
    z = q.to(dtype) + _ln_fwd(zb.to(dtype), ln_weight.to(dtype)[None, None], ln_bias.to(dtype)[None, None], eps)
    return z.to(q.dtype), (wt.to(W0.dtype), bt.to(b0.dtype))


@torch.library.custom_op("titanforge::ttt_mlp_fwd", mutates_args=())
def ttt_mlp_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, token_eta: torch.Tensor,
                gamma: torch.Tensor, beta: torch.Tensor, W10: torch.Tensor, b10: torch.Tensor, W20: torch.Tensor,
                b20: torch.Tensor, eps: float) -> list[torch.Tensor]:
    """As ttt_linear_fwd with the state (W1 [B, H, D, F], b1 [B, H, F], W2 [B, H, F, D], b2 [B, H, D]) ->
    [Z̄, W1_T, b1_T, W2_T, b2_T, and the four checkpoints [B, H, T/K, ...]] (states float32)."""
    B, T, H, D = q.shape
    Fh, KB = W10.shape[-1], token_eta.shape[0]
    n_mb = triton.cdiv(T, KB)
    f32 = dict(device=q.device, dtype=torch.float32)
    zb = torch.empty_like(q)
    shapes = [(D, Fh), (Fh,), (Fh, D), (D,)]
    ck = [torch.empty(B, H, n_mb, *s, **f32) for s in shapes]
    fin = [torch.empty(B, H, *s, **f32) for s in shapes]
    ttt_mlp_fwd_kernel[(B, H)](q, k, v, eta, token_eta, gamma, beta, W10, b10, W20, b20, zb, *ck, *fin, T, H, D, Fh,
                               eps, KB=KB, BD=_tile(D), BF=_tile(Fh), num_warps=8)
    return [zb, *fin, *ck]


@ttt_mlp_fwd.register_fake
def _(q, k, v, eta, token_eta, gamma, beta, W10, b10, W20, b20, eps):
    B, T, H, D = q.shape
    Fh = W10.shape[-1]
    n_mb = -(-T // token_eta.shape[0])
    f32 = dict(device=q.device, dtype=torch.float32)
    shapes = [(D, Fh), (Fh,), (Fh, D), (D,)]
    return [torch.empty_like(q), *[torch.empty(B, H, *s, **f32) for s in shapes],
            *[torch.empty(B, H, n_mb, *s, **f32) for s in shapes]]


@torch.library.custom_op("titanforge::ttt_mlp_bwd", mutates_args=())
def ttt_mlp_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, token_eta: torch.Tensor,
                gamma: torch.Tensor, beta: torch.Tensor, w1ck: torch.Tensor, b1ck: torch.Tensor, w2ck: torch.Tensor,
                b2ck: torch.Tensor, dzb: torch.Tensor, dfinal: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
    """dfinal: the four final-state gradients (all or none) -> [dq, dk, dv, deta, dtoken_eta, dgamma, dbeta,
    dW10, db10, dW20, db20]."""
    B, T, H, D = q.shape
    Fh, KB = w1ck.shape[-1], token_eta.shape[0]
    f32 = dict(device=q.device, dtype=torch.float32)
    dq, dk, dv, deta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(eta)
    dte = torch.empty(B, H, KB, **f32)
    dgamma, dbeta = torch.empty(B, H, D, **f32), torch.empty(B, H, D, **f32)
    d0 = [torch.empty(B, H, *s, **f32) for s in [(D, Fh), (Fh,), (Fh, D), (D,)]]
    dst = dfinal if dfinal else [None] * 4
    ttt_mlp_bwd_kernel[(B, H)](q, k, v, eta, token_eta, gamma, beta, w1ck, b1ck, w2ck, b2ck, dzb, *dst, dq, dk, dv,
                               deta, dte, dgamma, dbeta, *d0, T, H, D, Fh, eps, HAS_DST=bool(dfinal), KB=KB,
                               BD=_tile(D), BF=_tile(Fh), num_warps=8)
    return [dq, dk, dv, deta, dte.sum((0, 1)), dgamma.sum(0), dbeta.sum(0), *d0]


@ttt_mlp_bwd.register_fake
def _(q, k, v, eta, token_eta, gamma, beta, w1ck, b1ck, w2ck, b2ck, dzb, dfinal, eps):
    B, T, H, D = q.shape
    Fh = w1ck.shape[-1]
    f32 = dict(device=q.device, dtype=torch.float32)
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(eta),
            torch.empty(token_eta.shape, **f32), torch.empty(H, D, **f32), torch.empty(H, D, **f32),
            *[torch.empty(B, H, *s, **f32) for s in [(D, Fh), (Fh,), (Fh, D), (D,)]]]


def _mlp_setup(ctx, inputs, output):
    q, k, v, eta, token_eta, gamma, beta, W10, b10, W20, b20, eps = inputs
    ctx.save_for_backward(q, k, v, eta, token_eta, gamma, beta, *output[5:9])
    ctx.eps = eps
    ctx.dtypes = [t.dtype for t in (token_eta, gamma, beta, W10, b10, W20, b20)]


def _mlp_backward(ctx, grads):
    q, k, v, eta, token_eta, gamma, beta, *ck = ctx.saved_tensors
    dzb, dfin = grads[0], grads[1:5]
    if all(g is None for g in dfin):
        dfin = []
    else:
        dfin = [torch.zeros_like(c[:, :, 0]) if g is None else g.float().contiguous() for g, c in zip(dfin, ck)]
    out = ttt_mlp_bwd(q, k, v, eta, token_eta, gamma, beta, *ck, dzb.contiguous(), dfin, ctx.eps)
    params = [g.to(t) for g, t in zip(out[4:], ctx.dtypes)]
    return (*out[:4], *params, None)


ttt_mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def fits_mlp(q: torch.Tensor, token_eta: torch.Tensor, hidden: int) -> bool:
    """As `fits`, and the hidden width F at most 512 (both [D, F] states stay on chip)."""
    return fits(q, token_eta) and hidden <= 512


def ttt_mlp_triton(q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state, eps: float = 1e-6):
    """(z [B, T, H, D], (W1, b1, W2, b2) final): chunk_ttt_mlp's contract."""
    from titanforge.kernels.ttt.chunk import _ln_fwd

    c = lambda t: t.contiguous()  # noqa: E731
    out = ttt_mlp_fwd(c(q), c(k), c(v), c(eta), c(token_eta), c(ln_weight), c(ln_bias),
                      *(c(s) for s in initial_state), float(eps))
    zb, fin = out[0], out[1:5]
    dtype = torch.promote_types(q.dtype, torch.float32)
    z = q.to(dtype) + _ln_fwd(zb.to(dtype), ln_weight.to(dtype)[None, None], ln_bias.to(dtype)[None, None], eps)
    return z.to(q.dtype), tuple(f.to(s.dtype) for f, s in zip(fin, initial_state))
