"""Chunk-parallel Titans memory update in plain torch, with a hand-written backward.

Titans (Behrouz, Zhong, Mirrokni 2025), Sec. 3.2, Eq. 16-18, generalised to a deep memory with
momentum and per-token gates. Within a chunk of b tokens every gradient is taken at the weights
M_0 of the chunk's start, so the per-token gradients are independent of each other and the
momentum / forgetting recurrences are linear in them:

    E_t = prod_{j<=t} eta_j,   beta_t = prod_{j<=t} (1 - alpha_j)      (cumsums in log space)
    S_b = E_b S_0 - sum_i theta_i (E_b / E_i) g_i
    M_b = beta_b M_0 + (sum_t beta_b/beta_t E_t) S_0 - sum_i theta_i (sum_{t>=i} beta_b/beta_t E_t/E_i) g_i

A layer's per-token gradient is the outer product g_i = a_i^T delta_i (input activation a_i,
back-propagated error delta_i), so each weighted sum over the chunk is one matmul
A^T diag(c) Delta: per-token weights are never materialised. Chunks are chained sequentially;
each token retrieves from M_0 of its chunk (see naive.py).

`ChunkMemoryFunction` runs the whole chunk chain in one autograd node. Its backward is written by
hand (derivation in README.md): it walks the chunks in reverse, recomputes each chunk's
activations from the saved chunk-start weights and differentiates through the inner backprop
(the second-order terms d delta / d W). Autograd through the ~20 small ops per chunk cost about
3x more in per-op overhead than the arithmetic itself at the sizes Titans runs on CPU.
The gate coefficients stay in autograd (one batched op over all chunks).

Axis glossary: B batch, T time, H heads, D head dim, N chunks, b chunk size; W_l [B, H, d_in, d_out].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_SQRT_2PI = 2.5066282746310002


def _silu_grads(z):
    """act'(z) and act''(z) of silu(z) = z s, s = sigmoid(z)."""
    s = torch.sigmoid(z)
    d1 = s * (1 + z * (1 - s))
    d2 = s * (1 - s) * (2 + z * (1 - 2 * s))
    return d1, d2


def _gelu_grads(z):
    """act'(z) and act''(z) of the exact gelu(z) = z Phi(z)."""
    phi = torch.exp(-0.5 * z * z) / _SQRT_2PI
    d1 = 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * phi
    d2 = phi * (2 - z * z)
    return d1, d2


# name -> (activation, first and second derivative), for the hand-written inner and outer backward.
ACTIVATIONS = {"silu": (F.silu, _silu_grads), "gelu": (F.gelu, _gelu_grads)}
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


def mlp_apply(W, x, act):
    for i, w in enumerate(W):
        x = x @ w
        if i < len(W) - 1:
            x = act(x)
    return x


def _chunk_forward(W, x, v, act, act_grads, b):
    """MLP forward of the stacked rows x = [q; k] ([B, H, 2b, Dk]) at the chunk-start weights W and
    the hand-written backprop of ||M(k) - v||^2 on the key rows.
    Returns (xs: layer inputs, zs: pre-activations, deltas: key-row errors per layer, d1s, d2s:
    act' and act'' of the key rows' hidden pre-activations)."""
    L = len(W)
    xs, zs = [x], []
    for l, w in enumerate(W):
        z = xs[-1] @ w
        zs.append(z)
        if l < L - 1:
            xs.append(act(z))
    delta = 2 * (zs[-1][..., b:, :] - v)
    deltas, d1s, d2s = [delta], [None] * (L - 1), [None] * (L - 1)
    for l in range(L - 2, -1, -1):
        d1s[l], d2s[l] = act_grads(zs[l][..., b:, :])
        delta = (delta @ W[l + 1].transpose(-1, -2)) * d1s[l]
        deltas.append(delta)
    return xs, zs, deltas[::-1], d1s, d2s


class ChunkMemoryFunction(torch.autograd.Function):
    """forward(activation, L, q, k, v [B, H, N, b, D], c_M0, c_S0_M, c_S0_S [B, H, N],
    c_g_M, c_g_S [B, H, N, b], *W (L tensors [B, H, d_in, d_out]), *S (L tensors, same shapes))
    -> (o [B, H, N, b, Dv], *W_final, *S_final)."""

    @staticmethod
    def forward(ctx, activation, L, q, k, v, c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S, *WS):
        act, act_grads = ACTIVATIONS[activation]
        W, S = list(WS[:L]), list(WS[L:])
        N, b = q.shape[2], q.shape[3]
        o = q.new_empty(*q.shape[:4], v.shape[-1])
        W_starts, S_starts = [], []
        for n in range(N):
            W_starts.append(W)
            S_starts.append(S)
            xs, zs, deltas, _, _ = _chunk_forward(W, torch.cat([q[:, :, n], k[:, :, n]], -2), v[:, :, n],
                                                  act, act_grads, b)
            o[:, :, n] = zs[-1][..., :b, :]
            # [B, H, b, 2]: each token's gradient weight in the M-end and the S-end state.
            c = torch.stack([c_g_M[:, :, n], c_g_S[:, :, n]], -1)
            a_M, b_M, b_S = (t[:, :, n, None, None] for t in (c_M0, c_S0_M, c_S0_S))
            W_new, S_new = [], []
            for l in range(L):
                d_out = deltas[l].shape[-1]
                # One matmul for both weighted sums: a^T [c_M * delta | c_S * delta] -> [d_in, 2 d_out].
                G = xs[l][..., b:, :].transpose(-1, -2) @ torch.cat([c[..., 0, None] * deltas[l], c[..., 1, None] * deltas[l]], -1)
                W_new.append(a_M * W[l] + b_M * S[l] - G[..., :d_out])
                S_new.append(b_S * S[l] - G[..., d_out:])
            W, S = W_new, S_new
        ctx.activation, ctx.L = activation, L
        ctx.W_starts, ctx.S_starts = W_starts, S_starts
        ctx.save_for_backward(q, k, v, c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S)
        return (o, *W, *S)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, *dWS):
        q, k, v, c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S = ctx.saved_tensors
        act, act_grads = ACTIVATIONS[ctx.activation]
        L = ctx.L
        N, b = q.shape[2], q.shape[3]
        zero = lambda t: torch.zeros_like(t)  # noqa: E731
        dW = [zero(w) if g is None else g for g, w in zip(dWS[:L], ctx.W_starts[-1])]
        dS = [zero(w) if g is None else g for g, w in zip(dWS[L:], ctx.W_starts[-1])]
        do = q.new_zeros(*q.shape[:4], v.shape[-1]) if do is None else do
        dq, dk, dv = zero(q), zero(k), zero(v)
        d_c_M0, d_c_S0_M, d_c_S0_S = zero(c_M0), zero(c_S0_M), zero(c_S0_S)
        d_c_g = torch.zeros(*c_g_M.shape, 2, dtype=c_g_M.dtype, device=c_g_M.device)
        for n in range(N - 1, -1, -1):
            W, S = ctx.W_starts[n], ctx.S_starts[n]
            xs, zs, deltas, d1s, d2s = _chunk_forward(W, torch.cat([q[:, :, n], k[:, :, n]], -2), v[:, :, n],
                                                      act, act_grads, b)
            c = torch.stack([c_g_M[:, :, n], c_g_S[:, :, n]], -1)  # [B, H, b, 2]
            a_M, b_M, b_S = (t[:, :, n, None, None] for t in (c_M0, c_S0_M, c_S0_S))
            # Linear part: W' = a W + b_M S - G_M, S' = b_S S - G_S.
            d_c_M0[:, :, n] = sum((g * w).sum((-1, -2)) for g, w in zip(dW, W))
            d_c_S0_M[:, :, n] = sum((g * s).sum((-1, -2)) for g, s in zip(dW, S))
            d_c_S0_S[:, :, n] = sum((g * s).sum((-1, -2)) for g, s in zip(dS, S))
            dW_prev = [a_M * g for g in dW]
            dS_prev = [b_M * gw + b_S * gs for gw, gs in zip(dW, dS)]
            # G_M = A^T (c_M delta), G_S = A^T (c_S delta), with dG_M = -dW', dG_S = -dS'.
            d_deltas, dA = [], []
            for l in range(L):
                A = xs[l][..., b:, :]
                d_out = deltas[l].shape[-1]
                dG = torch.cat([dW[l], dS[l]], -1)  # [B, H, d_in, 2 d_out]
                AdG = (A @ dG).unflatten(-1, (2, d_out))  # [B, H, b, 2, d_out]
                d_c_g[:, :, n] -= (AdG * deltas[l][..., None, :]).sum(-1)
                d_deltas.append(-(c[..., None] * AdG).sum(-2))
                cd = (c[..., None] * deltas[l][..., None, :]).flatten(-2)  # [B, H, b, 2 d_out]
                dA.append(-(cd @ dG.transpose(-1, -2)))
            # Inner backprop delta_l = (delta_{l+1} W_{l+1}^T) act'(z_l), differentiated.
            dz_key = [None] * L
            for l in range(L - 1):
                dP = d_deltas[l] * d1s[l]
                d_deltas[l + 1] = d_deltas[l + 1] + dP @ W[l + 1]
                dW_prev[l + 1] = dW_prev[l + 1] + dP.transpose(-1, -2) @ deltas[l + 1]
                P = deltas[l + 1] @ W[l + 1].transpose(-1, -2)
                dz_key[l] = d_deltas[l] * P * d2s[l]
            # delta_L = 2 (z_L - v) on the key rows.
            dz_key[L - 1] = 2 * d_deltas[L - 1]
            dv[:, :, n] = -2 * d_deltas[L - 1]
            # Outer MLP backward over the stacked rows [q; k] (read and key forward share W).
            dZ = torch.cat([do[:, :, n], dz_key[L - 1]], -2)
            for l in range(L - 1, -1, -1):
                dW_prev[l] = dW_prev[l] + xs[l].transpose(-1, -2) @ dZ
                dX = dZ @ W[l].transpose(-1, -2)
                dX[..., b:, :] += dA[l]
                if l == 0:
                    dq[:, :, n], dk[:, :, n] = dX[..., :b, :], dX[..., b:, :]
                else:
                    dZ = dX * act_grads(zs[l - 1])[0]
                    dZ[..., b:, :] += dz_key[l - 1]
            dW, dS = dW_prev, dS_prev
        return (None, None, dq, dk, dv, d_c_M0, d_c_S0_M, d_c_S0_S, d_c_g[..., 0], d_c_g[..., 1], *dW, *dS)


def chunk_titans_memory_fwd(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, activation):
    """Inputs already validated and laid out as [B, H, T, D] / gates [B, H, T]."""
    B, H, T = q.shape[:3]
    W = [w.expand(B, H, *w.shape[-2:]) if w.dim() == 3 else w for w in weights]
    S = [torch.zeros_like(w) for w in W] if momentum is None else list(momentum)
    L = len(W)
    outs = []
    # The full chunks in one call, a ragged tail as one more call with a shorter chunk (padding
    # cannot stand in for it: momentum keeps flowing into M through a padded token).
    n_full = T // chunk_size * chunk_size
    for start, end, b in ((0, n_full, chunk_size), (n_full, T, T - n_full)):
        if end == start:
            continue
        N = (end - start) // b
        part = lambda t: t[:, :, start:end].unflatten(2, (N, b))  # noqa: E731
        # Coefficients of all chunks of the call at once: [B, H, N(, b)].
        c_M0, c_S0_M, c_g_M, c_S0_S, c_g_S = chunk_coefficients(part(theta), part(eta), part(alpha))
        out = ChunkMemoryFunction.apply(activation, L, part(q), part(k), part(v),
                                        c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S, *W, *S)
        outs.append(out[0].flatten(2, 3))
        W, S = list(out[1:1 + L]), list(out[1 + L:])
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0], (W, S)
