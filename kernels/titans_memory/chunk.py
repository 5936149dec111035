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


def token_coefficients(theta, eta, alpha, scale=None):
    """Coefficients of the per-token weights inside a chunk, gates [..., b] (one chunk per row):
    M_t = a_t M_0 + bS_t S_0 - sum_{i<=t} C[t, i] g_i with a_t = beta_t,
    bS_t = sum_{j<=t} (beta_t/beta_j) E_j and C[t, i] = theta_i s_i sum_{j=i..t} (beta_t/beta_j)(E_j/E_i),
    i.e. C = (R P) diag(theta s) with R[t, j] = beta_t/beta_j, P[j, i] = E_j/E_i (lower triangular).
    scale: the clip's s_i [..., b] (None: 1). Returns (a, bS [..., b], C [..., b, b])."""
    b = theta.shape[-1]
    log_eta = torch.log(eta.clamp_min(_LOG_EPS)).cumsum(-1)
    log_beta = torch.log((1 - alpha).clamp_min(_LOG_EPS)).cumsum(-1)
    mask = torch.ones(b, b, dtype=torch.bool, device=theta.device).tril()
    R = (log_beta[..., :, None] - log_beta[..., None, :]).masked_fill(~mask, float("-inf")).exp()
    P = (log_eta[..., :, None] - log_eta[..., None, :]).masked_fill(~mask, float("-inf")).exp()
    step = theta if scale is None else theta * scale
    return log_beta.exp(), (R @ log_eta.exp()[..., None])[..., 0], (R @ P) * step[..., None, :]


def token_read(q, k, v, theta, eta, alpha, W, S, activation, clip=0.0):
    """y_t = M_t(q_t) with the per-token weights M_t of each chunk (Sec. 3.2's mini-batch form),
    by the dual form: never forms M_t. q, k [BH, N, b, Dk], v [BH, N, b, Dv], gates [BH, N, b];
    W, S: the chunk-start weights and momentum, per layer [BH, N, d_in, d_out]. Plain autograd.

    Layer by layer, with the key path's inputs x_{i,l} and errors delta_{i,l} at the chunk-start
    weights (the per-token gradients are g_{i,l} = x_{i,l}^T delta_{i,l}) and the query path's own
    inputs h_{t,l} (h_0 = q, h_{l+1} = act(z_l)):
        z_{t,l} = h_{t,l} M_{t,l} = a_t h W_l + bS_t h S_l - sum_{i<=t} C[t, i] (h_{t,l} . x_{i,l}) delta_{i,l}
    i.e. Z_l = a * (H W) + bS * (H S) - (C * (H X^T)) Delta: a masked, gate-weighted b x b product."""
    act, act_grads = ACTIVATIONS[activation]
    L = len(W)
    xs, zs = [k], []
    for l, w in enumerate(W):
        zs.append(xs[-1] @ w)
        if l < L - 1:
            xs.append(act(zs[-1]))
    deltas = [2 * (zs[-1] - v)]
    for l in range(L - 2, -1, -1):
        deltas.append((deltas[-1] @ W[l + 1].transpose(-1, -2)) * act_grads(zs[l])[0])
    deltas = deltas[::-1]
    scale = _clip_scale(xs, deltas, clip)[0] if clip else None
    a, bS, C = token_coefficients(theta, eta, alpha, scale)
    a, bS = a[..., None], bS[..., None]
    h = q
    for l in range(L):
        z = a * (h @ W[l]) + bS * (h @ S[l]) - (C * (h @ xs[l].transpose(-1, -2))) @ deltas[l]
        h = act(z) if l < L - 1 else z
    return h


def mlp_apply(W, x, act):
    for i, w in enumerate(W):
        x = x @ w
        if i < len(W) - 1:
            x = act(x)
    return x


def _key_forward(W, k, v, act, act_grads):
    """MLP forward of one chunk's keys k [BH, b, Dk] at its chunk-start weights W and the
    hand-written backprop of ||M(k) - v||^2. Returns (xs: layer inputs, deltas: errors at each
    layer's output, d1s: act' of the hidden pre-activations, Pd2s: (delta_{l+1} W_{l+1}^T) act''(z_l),
    the factor the backward needs for d delta_l / d z_l)."""
    L = len(W)
    xs, zs = [k], []
    for l, w in enumerate(W):
        zs.append(xs[-1] @ w)
        if l < L - 1:
            xs.append(act(zs[-1]))
    delta = 2 * (zs[-1] - v)
    deltas, d1s, Pd2s = [delta], [None] * (L - 1), [None] * (L - 1)
    for l in range(L - 2, -1, -1):
        d1s[l], d2 = act_grads(zs[l])
        P = delta @ W[l + 1].transpose(-1, -2)
        Pd2s[l] = P * d2
        delta = P * d1s[l]
        deltas.append(delta)
    return xs, deltas[::-1], d1s, Pd2s


def _clip_scale(xs, deltas, clip):
    """Per-token clip of the inner gradient: g_i = sum over layers of x_{i,l}^T delta_{i,l}, whose
    Frobenius norm^2 is sum_l |x_{i,l}|^2 |delta_{i,l}|^2 (outer products). Returns (scale
    s_i = clip / max(|g_i|, clip), |g_i|^2) [BH, b]."""
    sq = sum((x * x).sum(-1) * (d * d).sum(-1) for x, d in zip(xs, deltas))
    return clip / sq.clamp_min(clip * clip).sqrt(), sq


def _read_forward(W, q, act):
    """y = M(q) for every chunk at once: q [BH, N, b, Dk], W_l [BH, N, d_in, d_out]; returns the
    layer inputs and pre-activations for the backward."""
    xs, zs = [q], []
    for l, w in enumerate(W):
        zs.append(xs[-1] @ w)
        if l < len(W) - 1:
            xs.append(act(zs[-1]))
    return xs, zs


def _chain_forward(activation, clip, q, k, v, c_M0, c_S0_M, c_S0_S, c, W, S):
    """The chunk chain (see ChunkMemoryFunction); c = [c_g_M, c_g_S] stacked last, [BH, N, b, 2].
    Returns (o, W_final, S_final, chunk-start W and S stacked [BH, N, ...], saved key activations,
    read activations)."""
    act, act_grads = ACTIVATIONS[activation]
    L, N = len(W), q.shape[1]
    W_starts, S_starts, saved = [], [], []
    for n in range(N):
        W_starts.append(W)
        S_starts.append(S)
        xs, deltas, d1s, Pd2s = _key_forward(W, k[:, n], v[:, n], act, act_grads)
        saved.append((xs, deltas, d1s, Pd2s))
        a_M, b_M, b_S = (t[:, n, None, None] for t in (c_M0, c_S0_M, c_S0_S))
        cn = c[:, n]
        if clip:  # each token's gradient scaled to norm <= clip: its coefficients scale
            cn = cn * _clip_scale(xs, deltas, clip)[0][..., None]
        W_new, S_new = [], []
        for l in range(L):
            # W' = a W + b_M S - A^T (c_M delta), S' = b_S S - A^T (c_S delta); the adds ride on the bmm.
            At = xs[l].transpose(-1, -2)
            W_new.append(torch.baddbmm(torch.addcmul(a_M * W[l], b_M, S[l]), At, cn[:, :, 0, None] * deltas[l],
                                       alpha=-1))
            S_new.append(torch.baddbmm(b_S * S[l], At, cn[:, :, 1, None] * deltas[l], alpha=-1))
        W, S = W_new, S_new
    # [BH, N, d_in, d_out] per layer.
    W_st = [torch.stack([w[l] for w in W_starts], 1) for l in range(L)]
    S_st = [torch.stack([s[l] for s in S_starts], 1) for l in range(L)]
    xq, zq = _read_forward(W_st, q, act)
    return zq[-1], W, S, W_st, S_st, saved, xq, zq


def _chain_backward(activation, clip, do, dW, dS, c_M0, c_S0_M, c_S0_S, c, W_st, S_st, saved, xq, zq, dW_st=None,
                    dS_st=None):
    """Gradients of the chunk chain (derivation in README.md), walking the chunks in reverse."""
    act, act_grads = ACTIVATIONS[activation]
    L = len(W_st)
    BH, N = c.shape[:2]
    # Read path, all chunks at once: its weight gradients enter the chain below chunk by chunk.
    dW_read = [None] * L
    dZ = do
    for l in range(L - 1, -1, -1):
        dW_read[l] = xq[l].transpose(-1, -2) @ dZ
        dX = dZ @ W_st[l].transpose(-1, -2)
        if l:
            dZ = dX * act_grads(zq[l - 1])[0]
    dq = dX
    dk, dv = [None] * N, [None] * N
    d_c_g = torch.empty_like(c)
    dW_in, dS_in = [], []  # the state gradients arriving at each chunk's end, for the scalars below
    for n in range(N - 1, -1, -1):
        W = [w[:, n] for w in W_st]
        xs, deltas, d1s, Pd2s = saved[n]
        dW_in.append(dW)
        dS_in.append(dS)
        cn = c0 = c[:, n]  # [BH, b, 2]
        if clip:
            scale, sq = _clip_scale(xs, deltas, clip)
            cn = c0 * scale[..., None]
        a_M, b_M, b_S = (t[:, n, None, None] for t in (c_M0, c_S0_M, c_S0_S))
        # Linear part: W' = a W + b_M S - G_M, S' = b_S S - G_S.
        dW_prev = [torch.addcmul(r[:, n], a_M, g) for g, r in zip(dW, dW_read)]
        dS_prev = [torch.addcmul(b_S * gs, b_M, gw) for gw, gs in zip(dW, dS)]
        if dW_st is not None:  # the chunk-start states are outputs too (the per-token read uses them)
            dW_prev = [g + r[:, n] for g, r in zip(dW_prev, dW_st)]
            dS_prev = [g + r[:, n] for g, r in zip(dS_prev, dS_st)]
        # G_M = A^T (c_M delta), G_S = A^T (c_S delta), with dG_M = -dW', dG_S = -dS'.
        d_deltas, dA = [], []
        dcn = 0
        for l in range(L):
            d_out = deltas[l].shape[-1]
            ndG = torch.cat([dW[l], dS[l]], -1).neg_()  # [BH, d_in, 2 d_out]
            AdG = (xs[l] @ ndG).unflatten(-1, (2, d_out))  # [BH, b, 2, d_out]
            dcn = dcn + (AdG * deltas[l][:, :, None, :]).sum(-1)
            d_deltas.append((cn[..., None] * AdG).sum(-2))
            cd = (cn[..., None] * deltas[l][:, :, None, :]).flatten(-2)  # [BH, b, 2 d_out]
            dA.append(cd @ ndG.transpose(-1, -2))
        if clip:
            # c'_i = c_i s_i, s_i = clip |g_i|^-1 where |g_i|^2 = sq_i > clip^2 (else 1):
            # dc = dc' s, ds = <dc', c>, d sq = -s ds / (2 sq), then through sq = sum_l |x_l|^2 |delta_l|^2.
            d_c_g[:, n] = dcn * scale[..., None]
            dsq = torch.where(sq > clip * clip, -0.5 * scale * (dcn * c0).sum(-1) / sq, 0)
            for l in range(L):
                xn, dn = (xs[l] * xs[l]).sum(-1), (deltas[l] * deltas[l]).sum(-1)
                d_deltas[l] = d_deltas[l] + (2 * dsq * xn)[..., None] * deltas[l]
                dA[l] = dA[l] + (2 * dsq * dn)[..., None] * xs[l]
        else:
            d_c_g[:, n] = dcn
        # Inner backprop delta_l = (delta_{l+1} W_{l+1}^T) act'(z_l), differentiated.
        dz = [None] * L
        for l in range(L - 1):
            dP = d_deltas[l] * d1s[l]
            d_deltas[l + 1] = torch.baddbmm(d_deltas[l + 1], dP, W[l + 1])
            dW_prev[l + 1] = torch.baddbmm(dW_prev[l + 1], dP.transpose(-1, -2), deltas[l + 1])
            dz[l] = d_deltas[l] * Pd2s[l]
        # delta_L = 2 (z_L - v).
        dz[L - 1] = 2 * d_deltas[L - 1]
        dv[n] = -2 * d_deltas[L - 1]
        # Key forward z_l = x_l W_l, x_{l+1} = act(z_l).
        dZ = dz[L - 1]
        for l in range(L - 1, -1, -1):
            dW_prev[l] = torch.baddbmm(dW_prev[l], xs[l].transpose(-1, -2), dZ)
            dX = torch.baddbmm(dA[l], dZ, W[l].transpose(-1, -2))
            if l:
                dZ = torch.addcmul(dz[l - 1], dX, d1s[l - 1])
        dk[n] = dX
        dW, dS = dW_prev, dS_prev
    # Scalar coefficients: d a = <dW', W>, d b_M = <dW', S>, d b_S = <dS', S>, all chunks at once.
    dW_in = [torch.stack([g[l] for g in dW_in[::-1]], 1) for l in range(L)]
    dS_in = [torch.stack([g[l] for g in dS_in[::-1]], 1) for l in range(L)]
    inner = lambda xs, ys: sum((x * y).sum((-1, -2)) for x, y in zip(xs, ys))  # noqa: E731
    d_c_M0, d_c_S0_M, d_c_S0_S = inner(dW_in, W_st), inner(dW_in, S_st), inner(dS_in, S_st)
    return (dq, torch.stack(dk, 1), torch.stack(dv, 1),
            d_c_M0, d_c_S0_M, d_c_S0_S, d_c_g, dW, dS)


_COMPILED = []


def _chain_fns(compiled: bool):
    """(forward, backward) of the chunk chain: eager, or torch.compile'd (opt-in,
    `model.titans.compile_memory`). Compiled once per process; dynamo re-traces per new shape (a
    MAC model has one: every segment has the same chunk count and B*H)."""
    if not compiled:
        return _chain_forward, _chain_backward
    if not _COMPILED:
        _COMPILED.extend(torch.compile(f, dynamic=False) for f in (_chain_forward, _chain_backward))
    return _COMPILED


class ChunkMemoryFunction(torch.autograd.Function):
    """forward(activation, L, compiled, clip (0: off), q, k, v [BH, N, b, D], c_M0, c_S0_M, c_S0_S [BH, N],
    c_g_M, c_g_S [BH, N, b], *W (L tensors [BH, d_in, d_out]), *S (L tensors, same shapes))
    -> (o [BH, N, b, Dv], *W_final, *S_final, *W_starts, *S_starts [BH, N, d_in, d_out]).

    o reads each chunk's queries from its chunk-start weights (`read="chunk"`); the chunk-start
    states are returned (and differentiable) for `token_read`.

    Only the key rows walk the chunk chain; the reads M_n(q) of all chunks run batched after it
    from the saved chunk-start weights. Key-row activations are kept for the backward."""

    @staticmethod
    def forward(ctx, activation, L, compiled, clip, q, k, v, c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S, *WS):
        # [BH, N, b, 2]: each token's gradient weight in the M-end and the S-end state.
        c = torch.stack([c_g_M, c_g_S], -1)
        o, W, S, W_st, S_st, saved, xq, zq = _chain_fns(compiled)[0](activation, clip, q, k, v, c_M0, c_S0_M,
                                                                     c_S0_S, c, list(WS[:L]), list(WS[L:]))
        ctx.activation, ctx.L, ctx.compiled, ctx.clip = activation, L, compiled, clip
        ctx.saved, ctx.xq, ctx.zq = saved, xq, zq
        ctx.save_for_backward(c_M0, c_S0_M, c_S0_S, c, *W_st, *S_st)
        return (o, *W, *S, *W_st, *S_st)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, *dWS):
        c_M0, c_S0_M, c_S0_S, c, *WS_st = ctx.saved_tensors
        L = ctx.L
        W_st, S_st = WS_st[:L], WS_st[L:]
        dW = [torch.zeros_like(w[:, 0]) if g is None else g for g, w in zip(dWS[:L], W_st)]
        dS = [torch.zeros_like(w[:, 0]) if g is None else g for g, w in zip(dWS[L:2 * L], W_st)]
        dW_st, dS_st = None, None
        if any(g is not None for g in dWS[2 * L:]):
            dW_st = [torch.zeros_like(w) if g is None else g for g, w in zip(dWS[2 * L:3 * L], W_st)]
            dS_st = [torch.zeros_like(w) if g is None else g for g, w in zip(dWS[3 * L:], W_st)]
        do = torch.zeros_like(ctx.zq[-1]) if do is None else do
        dq, dk, dv, d_c_M0, d_c_S0_M, d_c_S0_S, d_c_g, dW, dS = _chain_fns(ctx.compiled)[1](
            ctx.activation, ctx.clip, do, dW, dS, c_M0, c_S0_M, c_S0_S, c, W_st, S_st, ctx.saved, ctx.xq, ctx.zq,
            dW_st, dS_st)
        return (None, None, None, None, dq, dk, dv, d_c_M0, d_c_S0_M, d_c_S0_S, d_c_g[..., 0], d_c_g[..., 1], *dW, *dS)


def chunk_titans_memory_fwd(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, activation,
                            compiled=False, clip=0.0, read="token", use_triton=False):
    """Inputs already validated and laid out as [B, H, T, D] / gates [B, H, T]. use_triton: the chunk
    chain's state walk runs the Triton kernel (triton.py); the reads stay here."""
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
        # B and H fold into one batch axis so every matmul is a plain strided bmm.
        bh = lambda t: t.flatten(0, 1)  # noqa: E731
        if use_triton:
            from titanforge.kernels.titans_memory.triton import titans_memory_chain

            chain = titans_memory_chain(*(bh(part(t)).contiguous() for t in (k, v)),
                                        *(bh(t).contiguous() for t in (c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S)),
                                        [bh(t).contiguous() for t in W], [bh(t).contiguous() for t in S], activation,
                                        float(clip))
            if read == "chunk":
                o = _read_forward(list(chain[2 * L:3 * L]), bh(part(q)), ACTIVATIONS[activation][0])[1][-1]
            out = (None, *chain)
        else:
            out = ChunkMemoryFunction.apply(activation, L, compiled, clip, *(bh(part(t)) for t in (q, k, v)),
                                            *(bh(t) for t in (c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S)),
                                            *(bh(t) for t in W), *(bh(t) for t in S))
            o = out[0]
        if read == "token":
            o = token_read(*(bh(part(t)) for t in (q, k, v, theta, eta, alpha)), list(out[1 + 2 * L:1 + 3 * L]),
                           list(out[1 + 3 * L:]), activation, clip)
        outs.append(o.unflatten(0, (B, H)).flatten(2, 3))
        W = [t.unflatten(0, (B, H)) for t in out[1:1 + L]]
        S = [t.unflatten(0, (B, H)) for t in out[1 + L:1 + 2 * L]]
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0], (W, S)
