"""The Titans memory's chunk chain (chunk.py's state walk) as Triton kernels, forward and backward.

One program per (batch row, head) keeps the memory weights W_l and momentum S_l (depth 1 or 2,
every width up to 128) on chip across all chunks of a call and runs, per chunk of b tokens, at the
chunk-start weights (README.md):

    key forward z_l = x_l W_l, x_{l+1} = act(z_l);  errors delta_L = 2 (z_L - v),
    delta_l = (delta_{l+1} W_{l+1}^T) act'(z_l);  clip s_i = tau / max(|g_i|, tau) with
    |g_i|^2 = sum_l |x_{i,l}|^2 |delta_{i,l}|^2;
    W_l <- c_M0 W_l + c_S0_M S_l - x_l^T (s c_g_M delta_l),   S_l <- c_S0_S S_l - x_l^T (s c_g_S delta_l)

and writes the state at every chunk start and the final state. The gate coefficients come from
chunk.py's `chunk_coefficients` (autograd).

The backward kernel (chunk.py's hand-written `_chain_backward`, README.md) walks the chunks in
reverse with the state's gradient (dW_l, dS_l) on chip: per chunk it reloads the saved chunk-start
state, recomputes the key forward and inner backprop (act' and act''), and forms dk, dv, the
gradients of the five coefficients (the scalar ones as <dW', W>, <dW', S>, <dS', S>), the clip's
path through |g_i| and the second-order terms d delta / d W, adding the chunk-start states' own
gradients (from the reads) as it passes them. The reads themselves (the per-token dual form,
`token_read`, or the chunk-start read) stay batched PyTorch over all chunks on the kernel's
chunk-start states. Arithmetic in float32 (`tl.dot` in IEEE float32).

Axis glossary: BH batch x heads, N chunks, b chunk size (KB its tile), DK key dim, DH hidden width,
DV value dim (BK, BHD, BV their power-of-two tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest memory width the kernel holds on chip (every layer's d_in and d_out).
MAX_DIM = 128
MAX_LAYERS = 2
_ACTS = {"silu": 0, "gelu": 1}


@triton.jit
def _act_and_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)) for silu (ACT=0) or the exact gelu (ACT=1)."""
    if ACT == 0:
        s = tl.sigmoid(z)
        return z * s, s * (1 + z * (1 - s))
    else:
        cdf = 0.5 * (1 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return z * cdf, cdf + z * pdf


@triton.jit
def _act_grads(z, ACT: tl.constexpr):
    """(act(z), act'(z), act''(z))."""
    if ACT == 0:
        s = tl.sigmoid(z)
        return z * s, s * (1 + z * (1 - s)), s * (1 - s) * (2 + z * (1 - 2 * s))
    else:
        cdf = 0.5 * (1 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return z * cdf, cdf + z * pdf, pdf * (2 - z * z)


@triton.jit
def _load_mat(P, base, o_r, o_c, n_r, n_c):
    m = (o_r[:, None] < n_r) & (o_c[None, :] < n_c)
    return tl.load(P + base + o_r[:, None] * n_c + o_c[None, :], mask=m, other=0.).to(tl.float32)


@triton.jit
def _store_mat(P, base, x, o_r, o_c, n_r, n_c):
    m = (o_r[:, None] < n_r) & (o_c[None, :] < n_c)
    tl.store(P + base + o_r[:, None] * n_c + o_c[None, :], x, mask=m)


@triton.jit
def titans_chain_fwd_kernel(K, V, CM0, CS0M, CS0S, CGM, CGS, W1, S1, W2, S2, W1ST, S1ST, W2ST, S2ST,
                            W1T, S1T, W2T, S2T, N, b, DK, DH, DV, clip,
                            L: tl.constexpr, ACT: tl.constexpr, CLIP: tl.constexpr, KB: tl.constexpr,
                            BK: tl.constexpr, BHD: tl.constexpr, BV: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    o_i = tl.arange(0, KB)
    o_k = tl.arange(0, BK)
    o_h = tl.arange(0, BHD)
    o_v = tl.arange(0, BV)
    m_i = o_i < b
    # Layer 1 maps DK -> D1 (DV for a depth-1 memory, DH for depth 2); layer 2 maps DH -> DV.
    if L == 1:
        D1 = DV
    else:
        D1 = DH
    w1 = _load_mat(W1, i_bh * DK * D1, o_k, o_h, DK, D1)
    s1 = _load_mat(S1, i_bh * DK * D1, o_k, o_h, DK, D1)
    if L == 2:
        w2 = _load_mat(W2, i_bh * DH * DV, o_h, o_v, DH, DV)
        s2 = _load_mat(S2, i_bh * DH * DV, o_h, o_v, DH, DV)
    for n in range(0, N):
        i_c = i_bh * N + n
        _store_mat(W1ST, i_c * DK * D1, w1, o_k, o_h, DK, D1)
        _store_mat(S1ST, i_c * DK * D1, s1, o_k, o_h, DK, D1)
        if L == 2:
            _store_mat(W2ST, i_c * DH * DV, w2, o_h, o_v, DH, DV)
            _store_mat(S2ST, i_c * DH * DV, s2, o_h, o_v, DH, DV)
        k = _load_mat(K, i_c * b * DK, o_i, o_k, b, DK)
        c_m0 = tl.load(CM0 + i_c).to(tl.float32)
        c_s0m = tl.load(CS0M + i_c).to(tl.float32)
        c_s0s = tl.load(CS0S + i_c).to(tl.float32)
        c_gm = tl.load(CGM + i_c * b + o_i, mask=m_i, other=0.).to(tl.float32)
        c_gs = tl.load(CGS + i_c * b + o_i, mask=m_i, other=0.).to(tl.float32)
        if L == 1:
            v = _load_mat(V, i_c * b * DV, o_i, o_h, b, DV)
            z = tl.dot(k, w1, input_precision="ieee")
            d1 = 2 * (z - v)  # padded rows and columns: 0 - 0
            sq = tl.sum(k * k, axis=1) * tl.sum(d1 * d1, axis=1)
        else:
            v = _load_mat(V, i_c * b * DV, o_i, o_v, b, DV)
            z1 = tl.dot(k, w1, input_precision="ieee")
            x1, g1 = _act_and_grad(z1, ACT)  # act(0) = 0: padding stays 0
            z2 = tl.dot(x1, w2, input_precision="ieee")
            d2 = 2 * (z2 - v)
            d1 = tl.dot(d2, tl.trans(w2), input_precision="ieee") * g1
            sq = tl.sum(k * k, axis=1) * tl.sum(d1 * d1, axis=1) + tl.sum(x1 * x1, axis=1) * tl.sum(d2 * d2, axis=1)
        if CLIP:
            scale = clip / tl.sqrt(tl.maximum(sq, clip * clip))
            c_gm = c_gm * scale
            c_gs = c_gs * scale
        kt = tl.trans(k)
        w1_new = c_m0 * w1 + c_s0m * s1 - tl.dot(kt, c_gm[:, None] * d1, input_precision="ieee")
        s1 = c_s0s * s1 - tl.dot(kt, c_gs[:, None] * d1, input_precision="ieee")
        w1 = w1_new
        if L == 2:
            x1t = tl.trans(x1)
            w2_new = c_m0 * w2 + c_s0m * s2 - tl.dot(x1t, c_gm[:, None] * d2, input_precision="ieee")
            s2 = c_s0s * s2 - tl.dot(x1t, c_gs[:, None] * d2, input_precision="ieee")
            w2 = w2_new
    _store_mat(W1T, i_bh * DK * D1, w1, o_k, o_h, DK, D1)
    _store_mat(S1T, i_bh * DK * D1, s1, o_k, o_h, DK, D1)
    if L == 2:
        _store_mat(W2T, i_bh * DH * DV, w2, o_h, o_v, DH, DV)
        _store_mat(S2T, i_bh * DH * DV, s2, o_h, o_v, DH, DV)


@triton.jit
def titans_chain_bwd_kernel(K, V, CM0, CS0M, CS0S, CGM, CGS, W1ST, S1ST, W2ST, S2ST, DW1, DS1, DW2, DS2,
                            DW1ST, DS1ST, DW2ST, DS2ST, DK, DV, DCM0, DCS0M, DCS0S, DCGM, DCGS,
                            DW1_0, DS1_0, DW2_0, DS2_0, N, b, DK_, DH, DV_, clip,
                            L: tl.constexpr, ACT: tl.constexpr, CLIP: tl.constexpr, HAS_DST: tl.constexpr,
                            KB: tl.constexpr, BK: tl.constexpr, BHD: tl.constexpr, BV: tl.constexpr):
    """The walk's backward (chunk.py's `_chain_backward`, README.md), chunks in reverse, the state's
    gradient (dW_l, dS_l) on chip; each chunk's key activations recomputed from its saved start state.
    DW1.. hold the final state's gradient (zeros when it has none)."""
    i_bh = tl.program_id(0).to(tl.int64)
    o_i = tl.arange(0, KB)
    o_k = tl.arange(0, BK)
    o_h = tl.arange(0, BHD)
    o_v = tl.arange(0, BV)
    m_i = o_i < b
    if L == 1:
        D1 = DV_
    else:
        D1 = DH
    dw1 = _load_mat(DW1, i_bh * DK_ * D1, o_k, o_h, DK_, D1)
    ds1 = _load_mat(DS1, i_bh * DK_ * D1, o_k, o_h, DK_, D1)
    if L == 2:
        dw2 = _load_mat(DW2, i_bh * DH * DV_, o_h, o_v, DH, DV_)
        ds2 = _load_mat(DS2, i_bh * DH * DV_, o_h, o_v, DH, DV_)
    for n_rev in range(0, N):
        n = N - 1 - n_rev
        i_c = i_bh * N + n
        w1 = _load_mat(W1ST, i_c * DK_ * D1, o_k, o_h, DK_, D1)
        s1 = _load_mat(S1ST, i_c * DK_ * D1, o_k, o_h, DK_, D1)
        k = _load_mat(K, i_c * b * DK_, o_i, o_k, b, DK_)
        c_m0 = tl.load(CM0 + i_c).to(tl.float32)
        c_s0m = tl.load(CS0M + i_c).to(tl.float32)
        c_s0s = tl.load(CS0S + i_c).to(tl.float32)
        c0m = tl.load(CGM + i_c * b + o_i, mask=m_i, other=0.).to(tl.float32)
        c0s = tl.load(CGS + i_c * b + o_i, mask=m_i, other=0.).to(tl.float32)
        # The scalar coefficients: d c_M0 = <dW', W>, d c_S0_M = <dW', S>, d c_S0_S = <dS', S>.
        g_m0 = tl.sum(tl.sum(dw1 * w1, axis=1), axis=0)
        g_s0m = tl.sum(tl.sum(dw1 * s1, axis=1), axis=0)
        g_s0s = tl.sum(tl.sum(ds1 * s1, axis=1), axis=0)
        if L == 1:
            v = _load_mat(V, i_c * b * DV_, o_i, o_h, b, DV_)
            d1 = 2 * (tl.dot(k, w1, input_precision="ieee") - v)
            sq = tl.sum(k * k, axis=1) * tl.sum(d1 * d1, axis=1)
        else:
            w2 = _load_mat(W2ST, i_c * DH * DV_, o_h, o_v, DH, DV_)
            s2 = _load_mat(S2ST, i_c * DH * DV_, o_h, o_v, DH, DV_)
            g_m0 += tl.sum(tl.sum(dw2 * w2, axis=1), axis=0)
            g_s0m += tl.sum(tl.sum(dw2 * s2, axis=1), axis=0)
            g_s0s += tl.sum(tl.sum(ds2 * s2, axis=1), axis=0)
            v = _load_mat(V, i_c * b * DV_, o_i, o_v, b, DV_)
            z1 = tl.dot(k, w1, input_precision="ieee")
            x1, g1, h1 = _act_grads(z1, ACT)
            d2 = 2 * (tl.dot(x1, w2, input_precision="ieee") - v)
            P = tl.dot(d2, tl.trans(w2), input_precision="ieee")
            d1 = P * g1
            pd2 = P * h1
            sq = tl.sum(k * k, axis=1) * tl.sum(d1 * d1, axis=1) + tl.sum(x1 * x1, axis=1) * tl.sum(d2 * d2, axis=1)
        tl.store(DCM0 + i_c, g_m0)
        tl.store(DCS0M + i_c, g_s0m)
        tl.store(DCS0S + i_c, g_s0s)
        if CLIP:
            scale = clip / tl.sqrt(tl.maximum(sq, clip * clip))
        else:
            scale = tl.full([KB], 1.0, tl.float32)
        cm = c0m * scale
        cs = c0s * scale
        # Linear part: W' = a W + b_M S - G_M, S' = b_S S - G_S.
        pw1 = c_m0 * dw1
        ps1 = c_s0s * ds1 + c_s0m * dw1
        if HAS_DST:
            pw1 += _load_mat(DW1ST, i_c * DK_ * D1, o_k, o_h, DK_, D1)
            ps1 += _load_mat(DS1ST, i_c * DK_ * D1, o_k, o_h, DK_, D1)
        # G_M = X^T (c_M Delta), G_S = X^T (c_S Delta), dG = -dW', -dS'.
        am1 = -tl.dot(k, dw1, input_precision="ieee")
        as1 = -tl.dot(k, ds1, input_precision="ieee")
        dcm = tl.sum(am1 * d1, axis=1)
        dcs = tl.sum(as1 * d1, axis=1)
        dd1 = cm[:, None] * am1 + cs[:, None] * as1
        da1 = -tl.dot(cm[:, None] * d1, tl.trans(dw1), input_precision="ieee") \
            - tl.dot(cs[:, None] * d1, tl.trans(ds1), input_precision="ieee")
        if L == 2:
            pw2 = c_m0 * dw2
            ps2 = c_s0s * ds2 + c_s0m * dw2
            if HAS_DST:
                pw2 += _load_mat(DW2ST, i_c * DH * DV_, o_h, o_v, DH, DV_)
                ps2 += _load_mat(DS2ST, i_c * DH * DV_, o_h, o_v, DH, DV_)
            am2 = -tl.dot(x1, dw2, input_precision="ieee")
            as2 = -tl.dot(x1, ds2, input_precision="ieee")
            dcm += tl.sum(am2 * d2, axis=1)
            dcs += tl.sum(as2 * d2, axis=1)
            dd2 = cm[:, None] * am2 + cs[:, None] * as2
            da2 = -tl.dot(cm[:, None] * d2, tl.trans(dw2), input_precision="ieee") \
                - tl.dot(cs[:, None] * d2, tl.trans(ds2), input_precision="ieee")
        if CLIP:
            # c' = c s, s = clip / |g| where |g|^2 = sq > clip^2 (else 1): dc = dc' s,
            # d sq = -s <dc', c> / (2 sq), then through sq = sum_l |x_l|^2 |delta_l|^2.
            dsq = tl.where(sq > clip * clip,
                           -0.5 * scale * (dcm * c0m + dcs * c0s) / tl.maximum(sq, clip * clip), 0.)
            dd1 += (2 * dsq * tl.sum(k * k, axis=1))[:, None] * d1
            da1 += (2 * dsq * tl.sum(d1 * d1, axis=1))[:, None] * k
            if L == 2:
                dd2 += (2 * dsq * tl.sum(x1 * x1, axis=1))[:, None] * d2
                da2 += (2 * dsq * tl.sum(d2 * d2, axis=1))[:, None] * x1
        tl.store(DCGM + i_c * b + o_i, dcm * scale, mask=m_i)
        tl.store(DCGS + i_c * b + o_i, dcs * scale, mask=m_i)
        if L == 1:
            # delta = 2 (z - v), z = k W.
            dz = 2 * dd1
            _store_mat(DV, i_c * b * DV_, -dz, o_i, o_h, b, DV_)
            pw1 += tl.dot(tl.trans(k), dz, input_precision="ieee")
            dk = da1 + tl.dot(dz, tl.trans(w1), input_precision="ieee")
        else:
            # delta_1 = P act'(z1), P = delta_2 W2^T; delta_2 = 2 (z2 - v).
            dP = dd1 * g1
            dd2 += tl.dot(dP, w2, input_precision="ieee")
            pw2 += tl.dot(tl.trans(dP), d2, input_precision="ieee")
            dz1 = dd1 * pd2
            dz2 = 2 * dd2
            _store_mat(DV, i_c * b * DV_, -dz2, o_i, o_v, b, DV_)
            # z2 = x1 W2, x1 = act(z1), z1 = k W1.
            pw2 += tl.dot(tl.trans(x1), dz2, input_precision="ieee")
            dx1 = da2 + tl.dot(dz2, tl.trans(w2), input_precision="ieee")
            dz1 += dx1 * g1
            pw1 += tl.dot(tl.trans(k), dz1, input_precision="ieee")
            dk = da1 + tl.dot(dz1, tl.trans(w1), input_precision="ieee")
            dw2 = pw2
            ds2 = ps2
        _store_mat(DK, i_c * b * DK_, dk, o_i, o_k, b, DK_)
        dw1 = pw1
        ds1 = ps1
    _store_mat(DW1_0, i_bh * DK_ * D1, dw1, o_k, o_h, DK_, D1)
    _store_mat(DS1_0, i_bh * DK_ * D1, ds1, o_k, o_h, DK_, D1)
    if L == 2:
        _store_mat(DW2_0, i_bh * DH * DV_, dw2, o_h, o_v, DH, DV_)
        _store_mat(DS2_0, i_bh * DH * DV_, ds2, o_h, o_v, DH, DV_)


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@torch.library.custom_op("titanforge::titans_memory_chain", mutates_args=())
def titans_memory_chain(k: torch.Tensor, v: torch.Tensor, c_M0: torch.Tensor, c_S0_M: torch.Tensor,
                        c_S0_S: torch.Tensor, c_g_M: torch.Tensor, c_g_S: torch.Tensor, W: list[torch.Tensor],
                        S: list[torch.Tensor], activation: str, clip: float) -> list[torch.Tensor]:
    """k [BH, N, b, DK], v [BH, N, b, DV], c_M0/c_S0_M/c_S0_S [BH, N], c_g_M/c_g_S [BH, N, b]; W, S: per
    layer [BH, d_in, d_out] (float32) -> [*W_final, *S_final, *W_starts, *S_starts [BH, N, d_in, d_out]]."""
    BH, N, b, DK = k.shape
    DV = v.shape[-1]
    L = len(W)
    DH = W[0].shape[-1] if L == 2 else DV
    f32 = dict(device=k.device, dtype=torch.float32)
    fin = [torch.empty(w.shape, **f32) for w in W + S]
    st = [torch.empty(BH, N, *w.shape[-2:], **f32) for w in W + S]
    if L == 1:
        w1, s1, w2, s2 = W[0], S[0], W[0], S[0]  # layer-2 pointers unused
        w1t, s1t, w2t, s2t = fin[0], fin[1], fin[0], fin[1]
        w1st, s1st, w2st, s2st = st[0], st[1], st[0], st[1]
    else:
        w1, w2, s1, s2 = W[0], W[1], S[0], S[1]
        w1t, w2t, s1t, s2t = fin
        w1st, w2st, s1st, s2st = st
    c = lambda t: t.contiguous()  # noqa: E731
    titans_chain_fwd_kernel[(BH,)](
        c(k), c(v), c(c_M0), c(c_S0_M), c(c_S0_S), c(c_g_M), c(c_g_S), c(w1), c(s1), c(w2), c(s2),
        w1st, s1st, w2st, s2st, w1t, s1t, w2t, s2t, N, b, DK, DH, DV, float(clip),
        L=L, ACT=_ACTS[activation], CLIP=bool(clip), KB=_tile(b), BK=_tile(DK), BHD=_tile(DH if L == 2 else DV),
        BV=_tile(DV), num_warps=8)
    return [*fin, *st]


@titans_memory_chain.register_fake
def _(k, v, c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S, W, S, activation, clip):
    BH, N = k.shape[:2]
    f32 = dict(device=k.device, dtype=torch.float32)
    return [*(torch.empty(w.shape, **f32) for w in W + S), *(torch.empty(BH, N, *w.shape[-2:], **f32) for w in W + S)]


def _setup(ctx, inputs, output):
    k, v, c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S, W, S, activation, clip = inputs
    L = len(W)
    ctx.L, ctx.activation, ctx.clip = L, activation, clip
    ctx.save_for_backward(k, v, c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S, *output[2 * L:])


@torch.library.custom_op("titanforge::titans_memory_chain_bwd", mutates_args=())
def titans_memory_chain_bwd(k: torch.Tensor, v: torch.Tensor, c_M0: torch.Tensor, c_S0_M: torch.Tensor,
                            c_S0_S: torch.Tensor, c_g_M: torch.Tensor, c_g_S: torch.Tensor, W_st: list[torch.Tensor],
                            S_st: list[torch.Tensor], dW: list[torch.Tensor], dS: list[torch.Tensor],
                            dW_st: list[torch.Tensor], dS_st: list[torch.Tensor], activation: str,
                            clip: float) -> list[torch.Tensor]:
    """The chain's gradients: dW, dS the final state's (float32, given), dW_st, dS_st the chunk-start
    states' (all or none) -> [dk, dv, d_c_M0, d_c_S0_M, d_c_S0_S, d_c_g_M, d_c_g_S, *dW0, *dS0]."""
    BH, N, b, DK = k.shape
    DV = v.shape[-1]
    L = len(W_st)
    DH = W_st[0].shape[-1] if L == 2 else DV
    f32 = dict(device=k.device, dtype=torch.float32)
    dk, dv = torch.empty(k.shape, **f32), torch.empty(v.shape, **f32)
    dco = [torch.empty(BH, N, **f32) for _ in range(3)] + [torch.empty(BH, N, b, **f32) for _ in range(2)]
    d0 = [torch.empty(w.shape[:1] + w.shape[2:], **f32) for w in W_st + S_st]
    has_dst = bool(dW_st)
    c = lambda t: t.contiguous()  # noqa: E731
    pair = lambda xs: [c(xs[0]), c(xs[0])] if L == 1 else [c(x) for x in xs]  # noqa: E731  layer-2 slots unused at L=1
    w1st, w2st = pair(W_st)
    s1st, s2st = pair(S_st)
    dw1, dw2 = pair(dW)
    ds1, ds2 = pair(dS)
    dw1st, dw2st = pair(dW_st) if has_dst else (dw1, dw1)
    ds1st, ds2st = pair(dS_st) if has_dst else (dw1, dw1)
    dw1_0, dw2_0 = pair(d0[:L])
    ds1_0, ds2_0 = pair(d0[L:])
    titans_chain_bwd_kernel[(BH,)](
        c(k), c(v), c(c_M0), c(c_S0_M), c(c_S0_S), c(c_g_M), c(c_g_S), w1st, s1st, w2st, s2st, dw1, ds1, dw2, ds2,
        dw1st, ds1st, dw2st, ds2st, dk, dv, *dco, dw1_0, ds1_0, dw2_0, ds2_0, N, b, DK, DH, DV, float(clip),
        L=L, ACT=_ACTS[activation], CLIP=bool(clip), HAS_DST=has_dst, KB=_tile(b), BK=_tile(DK),
        BHD=_tile(DH if L == 2 else DV), BV=_tile(DV), num_warps=8)
    return [dk, dv, *dco, *d0]


@titans_memory_chain_bwd.register_fake
def _(k, v, c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S, W_st, S_st, dW, dS, dW_st, dS_st, activation, clip):
    BH, N, b = k.shape[:3]
    f32 = dict(device=k.device, dtype=torch.float32)
    return [torch.empty(k.shape, **f32), torch.empty(v.shape, **f32), *(torch.empty(BH, N, **f32) for _ in range(3)),
            *(torch.empty(BH, N, b, **f32) for _ in range(2)),
            *(torch.empty(w.shape[:1] + w.shape[2:], **f32) for w in W_st + S_st)]


def _backward(ctx, grads):
    k, v, c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S, *st = ctx.saved_tensors
    L = ctx.L
    W_st, S_st = st[:L], st[L:]
    g = [None if x is None else x.float() for x in grads]
    dW = [torch.zeros_like(w[:, 0]) if x is None else x for x, w in zip(g[:L], W_st)]
    dS = [torch.zeros_like(w[:, 0]) if x is None else x for x, w in zip(g[L:2 * L], W_st)]
    dW_st = dS_st = []
    if any(x is not None for x in g[2 * L:]):
        dW_st = [torch.zeros_like(w) if x is None else x for x, w in zip(g[2 * L:3 * L], W_st)]
        dS_st = [torch.zeros_like(w) if x is None else x for x, w in zip(g[3 * L:], W_st)]
    out = titans_memory_chain_bwd(k, v, c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S, list(W_st), list(S_st), dW, dS, dW_st,
                                  dS_st, ctx.activation, float(ctx.clip))
    dk, dv, *dco = out[:7]
    d0 = out[7:]
    return (dk.to(k.dtype), dv.to(v.dtype), *(d.to(t.dtype) for d, t in zip(dco, (c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S))),
            d0[:L], d0[L:], None, None)


titans_memory_chain.register_autograd(_backward, setup_context=_setup)


def fits(k: torch.Tensor, weights: list[torch.Tensor], activation: str) -> bool:
    """Whether the kernel takes this memory: depth 1 or 2, every width at most MAX_DIM, silu or gelu."""
    return (len(weights) <= MAX_LAYERS and activation in _ACTS
            and all(max(w.shape[-2:]) <= MAX_DIM for w in weights) and k.shape[-1] <= MAX_DIM)
