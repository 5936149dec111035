"""Chunk-parallel Titans memory update in plain torch (the reference the Triton kernel will match).

Titans (Behrouz, Zhong, Mirrokni 2025), Sec. 3.2, Eq. 16-18, generalised to a deep memory with
momentum and per-token gates. Within a chunk of b tokens every gradient is taken at the weights
M_0 of the chunk's start, so the per-token gradients are independent of each other and the
momentum / forgetting recurrences are linear in them:

    E_t = prod_{j<=t} eta_j,   beta_t = prod_{j<=t} (1 - alpha_j)      (cumsums in log space)
    S_b = E_b S_0 - sum_i theta_i (E_b / E_i) g_i
    M_b = beta_b M_0 + (sum_t beta_b/beta_t E_t) S_0 - sum_i theta_i (sum_{t>=i} beta_b/beta_t E_t/E_i) g_i

A layer's per-token gradient is the outer product g_i = a_i^T delta_i (input activation a_i,
back-propagated error delta_i), so each weighted sum over the chunk is one matmul
A^T diag(c) Delta: per-token weights are never materialised. The inner backprop is written by
hand in torch ops, so autograd differentiates through it for the outer (model) gradients.
Chunks are chained sequentially; each token retrieves from M_0 of its chunk (see naive.py).

Axis glossary: B batch, T time, H heads, D head dim, N chunks, b chunk size; W_l [B, H, d_in, d_out].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (activation, derivative) pairs for the hand-written inner backward.
_SQRT_2PI = 2.5066282746310002


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _gelu_grad(z):
    return 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) / _SQRT_2PI


ACTIVATIONS = {"silu": (F.silu, _silu_grad), "gelu": (F.gelu, _gelu_grad)}
# Gates are clamped away from 0 before the log so a saturated sigmoid cannot produce log(0) = -inf.
_LOG_EPS = 1e-12


def chunk_coefficients(theta, eta, alpha):
    """Scalar weights of the chunk-end state. Gates [..., b] (one chunk per row) ->
    (c_M0, c_S0_M, c_g_M [..., b], c_S0_S, c_g_S [..., b])."""
    b = theta.shape[-1]
    log_eta = torch.log(eta.clamp_min(_LOG_EPS)).cumsum(-1)          # log E_t
    log_beta = torch.log((1 - alpha).clamp_min(_LOG_EPS)).cumsum(-1)  # log beta_t
    # P[t, i] = E_t / E_i for i <= t, 0 above the diagonal (masked before exp: no inf * 0).
    diff = log_eta[..., :, None] - log_eta[..., None, :]
    mask = torch.ones(b, b, dtype=torch.bool, device=theta.device).tril()
    P = diff.masked_fill(~mask, float("-inf")).exp()
    r = (log_beta[..., -1:] - log_beta).exp()                          # beta_b / beta_t
    c_M0 = log_beta[..., -1].exp()
    c_S0_M = (r * log_eta.exp()).sum(-1)
    c_g_M = theta * (r[..., None, :] @ P)[..., 0, :]
    c_S0_S = log_eta[..., -1].exp()
    c_g_S = theta * P[..., -1, :]
    return c_M0, c_S0_M, c_g_M, c_S0_S, c_g_S


def _forward_backward(W, k, v, act, act_grad):
    """Inner MLP forward at the chunk-start weights and hand-written backprop of ||M(k) - v||^2.
    Returns per-layer (inputs A_l [B, H, b, d_in], errors Delta_l [B, H, b, d_out])."""
    acts, pre = [k], []
    x = k
    for i, w in enumerate(W):
        z = x @ w
        if i < len(W) - 1:
            pre.append(z)
            x = act(z)
            acts.append(x)
        else:
            x = z
    delta = 2 * (x - v)
    deltas = [delta]
    for i in range(len(W) - 1, 0, -1):
        delta = (delta @ W[i].transpose(-1, -2)) * act_grad(pre[i - 1])
        deltas.append(delta)
    return acts, deltas[::-1]


def mlp_apply(W, x, act):
    for i, w in enumerate(W):
        x = x @ w
        if i < len(W) - 1:
            x = act(x)
    return x


def _chunk_step(W, S, q, k, v, coeffs, act, act_grad):
    c_M0, c_S0_M, c_g_M, c_S0_S, c_g_S = coeffs
    o = mlp_apply(W, q, act)
    acts, deltas = _forward_backward(W, k, v, act, act_grad)
    # [2, B, H, b]: the M-end and S-end weights of each token's gradient, one batched matmul.
    c_g = torch.stack([c_g_M, c_g_S])
    W_new, S_new = [], []
    for w, s, a, d in zip(W, S, acts, deltas):
        G = a.transpose(-1, -2) @ (c_g[..., None] * d)  # [2, B, H, d_in, d_out]
        s0 = 0 if s is None else s
        W_new.append(c_M0[..., None, None] * w + c_S0_M[..., None, None] * s0 - G[0])
        S_new.append(c_S0_S[..., None, None] * s0 - G[1])
    return o, W_new, S_new


def chunk_titans_memory_fwd(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, activation):
    """Inputs already validated and laid out as [B, H, T, D] / gates [B, H, T]."""
    act, act_grad = ACTIVATIONS[activation]
    T = q.shape[2]
    n_full = T // chunk_size
    # Coefficients of all full chunks at once ([B, H, N, b]), the ragged tail separately.
    coeffs_full = None
    if n_full:
        split = [g[..., : n_full * chunk_size].unflatten(-1, (n_full, chunk_size)) for g in (theta, eta, alpha)]
        coeffs_full = chunk_coefficients(*split)
    W, S = list(weights), list(momentum) if momentum is not None else [None] * len(weights)
    outs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        n = start // chunk_size
        if end - start == chunk_size:
            coeffs = [c[:, :, n] for c in coeffs_full]
        else:
            coeffs = chunk_coefficients(theta[..., start:end], eta[..., start:end], alpha[..., start:end])
        o, W, S = _chunk_step(W, S, q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], coeffs,
                              act, act_grad)
        outs.append(o)
    B, H = q.shape[:2]
    W = [w.expand(B, H, *w.shape[-2:]) if w.dim() == 3 else w for w in W]
    S = [torch.zeros_like(w) if s is None else s for s, w in zip(S, W)]
    return torch.cat(outs, dim=2), (W, S)
