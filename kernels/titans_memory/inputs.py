"""The memory's inputs from its fused projection: short conv + SiLU, l2-normalised q and k, gates.

`titans_memory_inputs(z, conv_weight, cache, heads, theta_max, gate_bias=b)` takes z = x [W_q; W_k; W_v;
W_theta; W_eta; W_alpha]^T, [B, T, 3C + 3H] (C = H D), and returns what the memory update reads:

    u = silu(depthwise causal conv_K(z[..., :3C]))          (inputs before t = 0 from `cache`)
    q, k = u's q and k heads / max(||head||, eps);  v = u's v heads         [B, T, H, D] each
    theta = theta_max sigmoid(z_theta + b_theta), eta = sigmoid(z_eta + b_eta),
    alpha = sigmoid(z_alpha + b_alpha)                                                  [B, T, H]
    cache' = the last K-1 conv inputs, [B, K-1, 3C] (continues the stream in the next piece)

On CPU float32/float64 this is one C loop forward and one backward (`csrc/memory_inputs.c`),
instead of ~15 framework ops each way (split, conv, SiLU, head views, norm, three sigmoids, and the
concatenations their backward makes); the MAC loop calls it once per segment. Elsewhere it is the
plain-PyTorch form below, which the C loop is tested against.
Axis glossary: B batch, T time, H heads, D head dim, C3 = 3 H D conv channels, K conv width.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from titanforge.kernels.native import check_inputs, kernel, ptr, use_native

SOURCE = str(Path(__file__).with_name("csrc") / "memory_inputs.c")
EPS = 1e-12  # torch.nn.functional.normalize's
_i64, _int, _f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_double


def memory_inputs_torch(z, conv_weight, cache, heads, theta_max, eps=EPS, gate_bias=None):
    """The plain-PyTorch form (any device and dtype); shapes as in `titans_memory_inputs`."""
    B, T, _ = z.shape
    C3, K = conv_weight.shape[0], conv_weight.shape[-1]
    H, D = heads, C3 // (3 * heads)
    x, logits = z.split([C3, 3 * H], -1)
    if gate_bias is not None:
        logits = logits + gate_bias.to(z.dtype)
    pre = cache if cache is not None else z.new_zeros(B, K - 1, C3)
    xp = torch.cat([pre.to(z.dtype), x], 1)  # [B, K-1+T, C3]
    w = conv_weight[:, 0].to(z.dtype)  # [C3, K]
    a = xp[:, :T] * w[:, 0]
    for j in range(1, K):
        a = torch.addcmul(a, xp[:, j:j + T], w[:, j])
    u = F.silu(a).view(B, T, 3 * H, D)
    qk, v = u.split([2 * H, H], 2)
    q, k = (qk / torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min(eps)).split(H, 2)
    th, et, al = torch.sigmoid(logits).split(H, -1)
    return q, k, v, (theta_max * th, et, al), xp[:, xp.shape[1] - (K - 1):]


class MemoryInputsFunction(torch.autograd.Function):
    """z [B, T, 3C + 3H] (last dim contiguous), pre [B, K-1, 3C], wT [K, 3C] ->
    (q, k, v [B, T, H, D], theta, eta, alpha [B, T, H], cache' [B, K-1, 3C]), all contiguous.
    gb [3H] or None: the gate bias. Saves z, pre, wT, gb, q, k and the q/k head norms."""

    @staticmethod
    def forward(ctx, z, pre, wT, gb, H, theta_max, eps):
        check_inputs("Titans memory inputs", z, pre, wT, gb)
        z = z if z.stride(-1) == 1 and z.stride(1) == z.shape[-1] and z.stride(0) == z.shape[1] * z.shape[-1] \
            else z.contiguous()
        pre, wT = pre.contiguous(), wT.contiguous()
        gb = gb.contiguous() if gb is not None else None
        B, T, ldz = z.shape
        K, C3 = wT.shape
        D = C3 // (3 * H)
        q, k, v = (z.new_empty(B, T, H, D) for _ in range(3))
        th, et, al = (z.new_empty(B, T, H) for _ in range(3))
        nrm = z.new_empty(B, T, 2 * H)
        kernel(SOURCE, "memory_inputs_fwd", z.dtype)(
            ptr(z), ptr(pre), ptr(wT), ptr(gb), _i64(B), _i64(T), _i64(ldz), _i64(H), _i64(D), _i64(K), _f64(theta_max),
            _f64(eps), ptr(q), ptr(k), ptr(v), ptr(th), ptr(et), ptr(al), ptr(nrm), _int(torch.get_num_threads()))
        # cache' = the last K-1 rows of [pre; z[..., :3C]] (only those rows are copied)
        new_pre = (z[:, T - (K - 1):, :C3] if T >= K - 1 else torch.cat([pre[:, T:], z[..., :C3]], 1)).contiguous()
        ctx.save_for_backward(z, pre, wT, gb, q, k, nrm)
        ctx.H, ctx.theta_max, ctx.eps = H, theta_max, eps
        return q, k, v, th, et, al, new_pre

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv, dth, det, dal, dnew_pre):
        z, pre, wT, gb, q, k, nrm = ctx.saved_tensors
        B, T, ldz = z.shape
        K, C3 = wT.shape
        H, nthreads = ctx.H, torch.get_num_threads()
        grads = [g.contiguous() if g is not None else torch.zeros_like(ref)
                 for g, ref in ((dq, q), (dk, k), (dv, q), (dth, nrm[..., :H]), (det, nrm[..., :H]), (dal, nrm[..., :H]))]
        da = z.new_empty(B, T, C3)
        dz, dpre = torch.empty_like(z), torch.empty_like(pre)
        dw_part = z.new_empty(nthreads, K, C3)
        kernel(SOURCE, "memory_inputs_bwd", z.dtype)(
            ptr(z), ptr(pre), ptr(wT), ptr(gb), _i64(B), _i64(T), _i64(ldz), _i64(H), _i64(C3 // (3 * H)), _i64(K),
            _f64(ctx.theta_max), _f64(ctx.eps), ptr(q), ptr(k), ptr(nrm), *(ptr(g) for g in grads), ptr(da), ptr(dz),
            ptr(dpre), ptr(dw_part), _int(nthreads))
        if dnew_pre is not None and K > 1:  # cache' = the last K-1 rows of [pre; z[..., :3C]]
            n_z = min(T, K - 1)
            dz[:, T - n_z:, :C3] += dnew_pre[:, K - 1 - n_z:]
            if n_z < K - 1:
                dpre[:, n_z:] += dnew_pre[:, :K - 1 - n_z]
        dgb = dz[..., C3:].sum((0, 1)) if gb is not None and ctx.needs_input_grad[3] else None
        return dz, dpre, dw_part.sum(0), dgb, None, None, None


def titans_memory_inputs(z: torch.Tensor, conv_weight: torch.Tensor, cache: torch.Tensor | None, heads: int,
                         theta_max: float, backend: str = "auto", gate_bias: torch.Tensor | None = None):
    """(q, k, v [B, T, H, D], (theta, eta, alpha) [B, T, H], cache' [B, K-1, 3C]) from z [B, T, 3C + 3H],
    conv_weight [3C, 1, K] and cache [B, K-1, 3C] (None: zeros). gate_bias [3H] (theta, eta, alpha)
    is added to z's gate logits inside the op, so the projection before it can be a plain matmul (an
    addmm first copies its bias into the whole output). backend "auto": the C loop on CPU
    float32/float64 where it builds; "native" requires it; "torch" never uses it."""
    C3, K = conv_weight.shape[0], conv_weight.shape[-1]
    if z.dim() != 3 or z.shape[-1] != C3 + 3 * heads or C3 % (3 * heads):
        raise ValueError(f"titans_memory_inputs: z has shape {tuple(z.shape)}; expected [B, T, 3C + 3H] with "
                         f"3C = {C3} (conv_weight {tuple(conv_weight.shape)}) and H = {heads}")
    if cache is not None and cache.shape != (z.shape[0], K - 1, C3):
        raise ValueError(f"titans_memory_inputs: cache has shape {tuple(cache.shape)}, expected "
                         f"[{z.shape[0]}, {K - 1}, {C3}]")
    if gate_bias is not None and gate_bias.shape != (3 * heads,):
        raise ValueError(f"titans_memory_inputs: gate_bias has shape {tuple(gate_bias.shape)}, expected "
                         f"[{3 * heads}] (theta, eta, alpha per head)")
    if (not use_native(backend, z, SOURCE, "memory inputs", conv_weight, cache, gate_bias) or z.shape[1] == 0
            or conv_weight.dtype != z.dtype or (gate_bias is not None and gate_bias.dtype != z.dtype)):
        return memory_inputs_torch(z, conv_weight, cache, heads, theta_max, gate_bias=gate_bias)
    pre = cache if cache is not None else z.new_zeros(z.shape[0], K - 1, C3)
    q, k, v, th, et, al, new_pre = MemoryInputsFunction.apply(z, pre, conv_weight[:, 0].t(), gate_bias, heads,
                                                              theta_max, EPS)
    return q, k, v, (th, et, al), new_pre
