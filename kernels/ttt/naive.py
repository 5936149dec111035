"""Primal-form TTT reference: a loop over tokens that materialises the inner weights per token.

Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States" (arXiv
2407.04620), mini-batch TTT with the per-token / per-position learning rates of the official
ttt-lm-pytorch code (TTTLinear / TTTMLP). Obviously correct rather than fast: the inner gradient
of every token is taken with `torch.autograd.grad` (create_graph=True, so outer gradients flow
through it), not with a hand-derived LayerNorm backward, and every token i gets its own weights

    W_i = W_prev - token_eta[i] * sum_{j <= i in the mini-batch} eta_j * grad l(W_prev; x_j)
    z_i = q_i + LN(f_res(q_i; W_i))

where W_prev are the weights at the end of the previous mini-batch and
l(W; x_j) = 1/2 ||LN(f_res(k_j; W)) - (v_j - k_j)||^2 (the paper's ||f(k) - v||^2 with
f(x) = x + LN(f_res(x)), halved as in the official code). A final partial mini-batch of r < b
tokens is an ordinary mini-batch of length r using token_eta[:r]; the state after it is W_{r-1}.

Axis glossary: B batch, T time, H heads, D head dim, F inner hidden width (4D for the MLP).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

State = tuple[torch.Tensor, ...]


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    # x [B, H, D], weight/bias [H, D]: a separate LayerNorm per head.
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def _f_res_linear(x: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    W, b = params  # [B, H, D, D], [B, H, D]
    return torch.einsum("bhd,bhde->bhe", x, W) + b


def _f_res_mlp(x: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    W1, b1, W2, b2 = params  # [B, H, D, F], [B, H, F], [B, H, F, D], [B, H, D]
    h = F.gelu(torch.einsum("bhd,bhdf->bhf", x, W1) + b1, approximate="tanh")
    return torch.einsum("bhf,bhfd->bhd", h, W2) + b2


def _naive_ttt(f_res: Callable, q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state: State,
               eps: float) -> tuple[torch.Tensor, State]:
    B, T, H, D = q.shape
    b = token_eta.shape[0]
    state = tuple(initial_state)
    outputs = []
    for start in range(0, T, b):
        K = min(b, T - start)
        # The inner gradient needs a graph even where the state is a constant.
        prev = tuple(p if p.requires_grad else p.detach().requires_grad_() for p in state)
        grads = []
        with torch.enable_grad():
            for j in range(start, start + K):
                pred = _layer_norm(f_res(k[:, j], prev), ln_weight, ln_bias, eps)
                loss = 0.5 * ((pred - (v[:, j] - k[:, j])) ** 2).sum()
                grads.append(torch.autograd.grad(loss, prev, create_graph=True))
        for i in range(K):
            weights = []
            for n, p in enumerate(prev):
                # sum_{j<=i} eta_j * grad_j, eta_j [B, H] broadcast over the parameter's dims.
                acc = sum(eta[:, start + j].reshape(B, H, *[1] * (p.dim() - 2)) * grads[j][n]
                          for j in range(i + 1))
                weights.append(p - token_eta[i] * acc)
            weights = tuple(weights)
            t = start + i
            outputs.append(q[:, t] + _layer_norm(f_res(q[:, t], weights), ln_weight, ln_bias, eps))
        state = weights
    return torch.stack(outputs, dim=1), state


def naive_ttt_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                     token_eta: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                     initial_state: State, eps: float = 1e-6) -> tuple[torch.Tensor, State]:
    """TTT-Linear, primal form. q/k/v [B, T, H, D], eta [B, T, H], token_eta [b] (b = mini-batch
    size), ln_weight/ln_bias [H, D], initial_state (W [B, H, D, D], b [B, H, D]).
    Returns z [B, T, H, D] and the final state (same shapes as initial_state)."""
    return _naive_ttt(_f_res_linear, q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state, eps)


def naive_ttt_mlp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                  token_eta: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                  initial_state: State, eps: float = 1e-6) -> tuple[torch.Tensor, State]:
    """TTT-MLP, primal form; as `naive_ttt_linear` with initial_state
    (W1 [B, H, D, F], b1 [B, H, F], W2 [B, H, F, D], b2 [B, H, D])."""
    return _naive_ttt(_f_res_mlp, q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state, eps)


__all__ = ["naive_ttt_linear", "naive_ttt_mlp"]
