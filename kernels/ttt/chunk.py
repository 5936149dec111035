"""Dual-form mini-batch TTT in plain PyTorch (TTT-Linear and TTT-MLP).

Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States" (arXiv
2407.04620), section 2.5 ("dual form"), with the learning-rate details of the official
ttt-lm-pytorch code (TTTLinear / TTTMLP): inside a mini-batch of b tokens token i uses

    E[i, j] = token_eta[i] * eta_j        (j <= i, else 0)

where eta_j = eta_base * sigmoid(theta_lr x_j) / D comes from the caller per token and head, and
token_eta [b] is the per-position factor (1/(i+1) + a learnable offset in the official code).
All gradients of a mini-batch are taken at the weights W from the end of the previous one, so
for TTT-Linear (G = d l / d Z at Z = K W + b, the LayerNorm + L2 backward below)

    Z_bar = Q W + b - tril(E * (Q K^T + 1)) G      # per-token weights never materialised
    W'    = W - (E[b-1, :] * K)^T G,   b' = b - sum_j E[b-1, j] G_j
    z     = Q + LN(Z_bar)

and TTT-MLP applies the same identity to both layers (the second layer's "keys" are the hidden
activations GELU(K W1 + b1) of the mini-batch). Only the state recurrence runs in a Python loop
over mini-batches; E and the Q K^T products of all mini-batches are formed at once.

A final partial mini-batch of r < b tokens is an ordinary mini-batch of length r using
token_eta[:r] (as the official code does for a remainder); `final_state` is the state after it.
Hence splitting a sequence into pieces with carried state reproduces one pass exactly when the
piece boundaries are multiples of b; elsewhere the early boundary closes a mini-batch early.

The backward is torch autograd through this code (including through G, a second-order term);
on CUDA `chunk_ttt_linear` and `chunk_ttt_mlp` run the fused Triton forward and backward of
triton.py instead.
Computation runs in at least float32.

Axis glossary: B batch, T time, H heads, D head dim, F inner hidden width, N mini-batches,
K tokens in a mini-batch.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from titanforge.kernels.dispatch import pick
from titanforge.kernels.ttt import fused_cpu

State = tuple[torch.Tensor, ...]


def _ln_fwd(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mu) * torch.rsqrt(var + eps) * gamma + beta


def _ln_l2_bwd(x: torch.Tensor, target: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
               eps: float) -> torch.Tensor:
    """d/dx of 1/2 ||LN(x) - target||^2 (LayerNorm over the last axis), written out so the inner
    gradient is ordinary differentiable tensor code for the outer backward."""
    D = x.shape[-1]
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    std = torch.sqrt(var + eps)
    x_hat = (x - mu) / std
    g_hat = (gamma * x_hat + beta - target) * gamma
    return (D * g_hat - g_hat.sum(-1, keepdim=True)
            - x_hat * (g_hat * x_hat).sum(-1, keepdim=True)) / (D * std)


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    # d/dx of 0.5 x (1 + tanh(c (x + 0.044715 x^3))), exact constants (the official code
    # truncates c to 8 digits).
    t = torch.tanh(_GELU_C * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x)


def _linear_step(q, k, v, E, A, state: State, gamma, beta, eps):
    W, b = state  # [B, H, D, D], [B, H, D]
    b = b.unsqueeze(-2)
    Z = k @ W + b  # [B, H, K, D]
    G = _ln_l2_bwd(Z, v - k, gamma, beta, eps)
    Z_bar = q @ W + b - A @ G
    e_last = E[..., -1, :, None]  # [B, H, K, 1]
    W = W - (e_last * k).transpose(-1, -2) @ G
    b = b - (e_last * G).sum(-2, keepdim=True)
    return Z_bar, (W, b.squeeze(-2))


def _mlp_step(q, k, v, E, A, state: State, gamma, beta, eps):
    W1, b1, W2, b2 = state  # [B, H, D, F], [B, H, F], [B, H, F, D], [B, H, D]
    b1, b2 = b1.unsqueeze(-2), b2.unsqueeze(-2)
    Z1 = k @ W1 + b1  # [B, H, K, F]
    X2 = F.gelu(Z1, approximate="tanh")
    Z2 = X2 @ W2 + b2  # [B, H, K, D]
    G2 = _ln_l2_bwd(Z2, v - k, gamma, beta, eps)
    G1 = (G2 @ W2.transpose(-1, -2)) * _gelu_tanh_grad(Z1)
    Z1_bar = q @ W1 + b1 - A @ G1
    X2_bar = F.gelu(Z1_bar, approximate="tanh")
    Z2_bar = X2_bar @ W2 + b2 - (E * (X2_bar @ X2.transpose(-1, -2) + 1)) @ G2
    e_last = E[..., -1, :, None]
    W1 = W1 - (e_last * k).transpose(-1, -2) @ G1
    b1 = b1 - (e_last * G1).sum(-2, keepdim=True)
    W2 = W2 - (e_last * X2).transpose(-1, -2) @ G2
    b2 = b2 - (e_last * G2).sum(-2, keepdim=True)
    return Z2_bar, (W1, b1.squeeze(-2), W2, b2.squeeze(-2))


def _dual_scan(step: Callable, q, k, v, eta, token_eta, ln_weight, ln_bias, state: State, eps: float):
    B, T, H, D = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (q, k, v))  # [B, H, T, D]
    eta = eta.transpose(1, 2).to(dtype)  # [B, H, T]
    token_eta = token_eta.to(dtype)
    state = tuple(s.to(dtype) for s in state)
    gamma, beta = ln_weight.to(dtype)[:, None, :], ln_bias.to(dtype)[:, None, :]  # [H, 1, D]
    b = token_eta.shape[0]
    n_full, rem = divmod(T, b)
    # Full mini-batches as one group, then the remainder as a group of one shorter mini-batch.
    groups = [(0, n_full, b)] if n_full else []
    if rem:
        groups.append((n_full * b, 1, rem))
    outputs = []
    for start, N, K in groups:
        window = slice(start, start + N * K)
        qc, kc, vc = (x[:, :, window].reshape(B, H, N, K, D) for x in (q, k, v))
        ec = eta[:, :, window].reshape(B, H, N, K)
        E = torch.tril(token_eta[:K, None] * ec[..., None, :])  # [B, H, N, K, K]
        A = E * (qc @ kc.transpose(-1, -2) + 1)
        # unbind, not indexing: the backward of x[:, :, n] writes into a zero tensor of the whole
        # group per mini-batch (quadratic in T); unbind's backward stacks all gradients once.
        for q_n, k_n, v_n, E_n, A_n in zip(*(x.unbind(2) for x in (qc, kc, vc, E, A))):
            Z_bar, state = step(q_n, k_n, v_n, E_n, A_n, state, gamma, beta, eps)
            outputs.append(Z_bar)
    z = q + _ln_fwd(torch.cat(outputs, dim=2), gamma, beta, eps)
    return z.transpose(1, 2), state


def _check(q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state, state_shapes, fn: str):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{fn}: q, k, v must all be [B, T, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if T == 0:
        raise ValueError(f"{fn}: the sequence is empty (T = 0)")
    if eta.shape != (B, T, H):
        raise ValueError(f"{fn}: eta must be [B, T, H] = {(B, T, H)} (one learning rate per token "
                         f"and head); got {tuple(eta.shape)}")
    if token_eta.dim() != 1 or token_eta.shape[0] == 0:
        raise ValueError(f"{fn}: token_eta must be a non-empty 1-D tensor of length mini_batch_size; "
                         f"got shape {tuple(token_eta.shape)}")
    if ln_weight.shape != (H, D) or ln_bias.shape != (H, D):
        raise ValueError(f"{fn}: ln_weight and ln_bias must be [H, D] = {(H, D)}; got "
                         f"{tuple(ln_weight.shape)}, {tuple(ln_bias.shape)}")
    got = [tuple(s.shape) for s in initial_state]
    if got != state_shapes:
        raise ValueError(f"{fn}: initial_state must have shapes {state_shapes} for q of shape "
                         f"{tuple(q.shape)}; got {got}")


def chunk_ttt_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                     token_eta: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                     initial_state: State, eps: float = 1e-6, backend: str = "auto") -> tuple[torch.Tensor, State]:
    """TTT-Linear layer, dual form: inner model f(x) = x + LN(x W + b) per head.

    q, k, v: [B, T, H, D] (theta_Q x, theta_K x, theta_V x).
    eta: [B, T, H] per-token inner learning rate (eta_base * sigmoid(theta_lr x) / D).
    token_eta: [b] per-position factor within a mini-batch; its length b is the mini-batch size.
    ln_weight, ln_bias: [H, D] the inner LayerNorm.
    initial_state: (W [B, H, D, D], b [B, H, D]): the inner weights at t = 0 (W_0 expanded over
    B, or the final_state of the previous piece of the sequence).
    backend: "auto" runs the fused C loop (fused_cpu.py) for CPU float32/float64 inputs where it
    builds, else this file's PyTorch dual form; "native" insists on the C loop, "torch" on PyTorch.
    Returns z [B, T, H, D] (dtype of q, computed in >= float32) and final_state (like initial_state).
    backend (kernels/dispatch.py): "auto" runs the Triton kernels of triton.py on CUDA where the shape
    fits them (power-of-two mini-batch >= 16, D <= 128), this PyTorch form elsewhere.
    """
    B, T, H, D = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    _check(q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state,
           [(B, H, D, D), (B, H, D)], "chunk_ttt_linear")
    others = (k, v, eta, token_eta, ln_weight, ln_bias, *initial_state)
    path = pick("ttt_linear", backend, q, *others, native_source=fused_cpu.SOURCE)
    if path == "triton":
        from titanforge.kernels.ttt import triton as ttt_triton

        if ttt_triton.fits(q, token_eta):
            return ttt_triton.ttt_linear_triton(q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state, eps)
        if backend == "triton":
            raise ValueError(f"chunk_ttt_linear: backend='triton' needs a power-of-two mini-batch (>= 16 on a GPU) "
                             f"and head dim <= 128; got {token_eta.shape[0]} and {q.shape[-1]} (use backend='auto')")
    if path == "native":
        dtype = torch.promote_types(q.dtype, torch.float32)
        args = [t.to(dtype) for t in (q, *others)]
        z, state = fused_cpu.fused_chunk_ttt_linear(*args[:7], tuple(args[7:]), eps)
        return z.to(q.dtype), state
    z, state = _dual_scan(_linear_step, q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state, eps)
    return z.to(q.dtype), state


def chunk_ttt_mlp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                  token_eta: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                  initial_state: State, eps: float = 1e-6, backend: str = "auto") -> tuple[torch.Tensor, State]:
    """TTT-MLP layer, dual form: f(x) = x + LN(GELU_tanh(x W1 + b1) W2 + b2) per head.

    Arguments as `chunk_ttt_linear` (backend included), with initial_state
    (W1 [B, H, D, F], b1 [B, H, F], W2 [B, H, F, D], b2 [B, H, D]); F is read from W1 (4D in the paper).
    backend as in `chunk_ttt_linear` (the Triton kernels also need F <= 512).
    """
    B, T, H, D = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    Fh = initial_state[0].shape[-1] if len(initial_state) == 4 else 0
    _check(q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state,
           [(B, H, D, Fh), (B, H, Fh), (B, H, Fh, D), (B, H, D)], "chunk_ttt_mlp")
    others = (k, v, eta, token_eta, ln_weight, ln_bias, *initial_state)
    path = pick("ttt_mlp", backend, q, *others, native_source=fused_cpu.SOURCE)
    if path == "triton":
        from titanforge.kernels.ttt import triton as ttt_triton

        if ttt_triton.fits_mlp(q, token_eta, Fh):
            return ttt_triton.ttt_mlp_triton(q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state, eps)
        if backend == "triton":
            raise ValueError(f"chunk_ttt_mlp: backend='triton' needs a power-of-two mini-batch (>= 16 on a GPU), "
                             f"head dim <= 128 and hidden <= 512; got {token_eta.shape[0]}, {D}, {Fh} (use "
                             f"backend='auto')")
    if path == "native":
        dtype = torch.promote_types(q.dtype, torch.float32)
        args = [t.to(dtype) for t in (q, *others)]
        z, state = fused_cpu.fused_chunk_ttt_mlp(*args[:7], tuple(args[7:]), eps)
        return z.to(q.dtype), state
    z, state = _dual_scan(_mlp_step, q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state, eps)
    return z.to(q.dtype), state
