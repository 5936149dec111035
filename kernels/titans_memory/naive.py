"""Token-by-token reference of the Titans neural long-term memory (Behrouz et al. 2025, Eq. 12-15).

The readable, obviously-correct loop the chunked op is tested against: it takes each token's
gradient with `torch.autograd.grad` (not the hand-written backprop of `chunk.py`), so the two share
no inner-gradient code. Works in float64.

Chunk semantics (shared with `chunk.py`): the sequence is cut into chunks of `chunk_size` tokens.
Every token of a chunk takes its gradient at the weights M_0 at the chunk's start (the memory
after all earlier chunks); the weights still move token by token (Eq. 13-14), so each token has
its own M_t. With chunk_size = 1 this is exactly the paper's recurrence, grad l(M_{t-1}; x_t).
Reads: `read="token"` (the paper's mini-batch form, Sec. 3.2) reads y_t = M_t(q_t), the weights
after token t's update; `read="chunk"` reads y_t = M_0(q_t), the chunk-start weights (cheaper).
`inner_grad_clip` (tau > 0) scales each token's gradient g_t (all layers together, per batch row
and head) by min(1, tau / ||g_t||) before it enters the momentum; None or 0: no clip.

Axis glossary: B batch, T time, H heads, D head dim; L_M memory layers; W_l [B, H, d_in, d_out].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def mlp_forward(weights: list[torch.Tensor], x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """M(x) for per-head MLP weights; x [B, H, N, d_in], W_l [H|B,H, d_in, d_out] -> [B, H, N, d_out]."""
    act = ACTIVATIONS[activation]
    for i, w in enumerate(weights):
        x = x @ w
        if i < len(weights) - 1:
            x = act(x)
    return x


def naive_titans_memory(q, k, v, theta, eta, alpha, *, weights, momentum=None, chunk_size: int = 1,
                        activation: str = "silu", read: str = "chunk", inner_grad_clip: float | None = None):
    """Loop over time. q, k [B, T, H, Dk], v [B, T, H, Dv], theta/eta/alpha [B, T, H].

    Returns o [B, T, H, Dv] and the final state (weights, momentum), lists of [B, H, d_in, d_out].
    """
    B, T, H, _ = q.shape
    W = [w.expand(B, *w.shape[-3:]) if w.dim() == 3 else w for w in weights]
    # autograd.grad needs a graph even when nothing upstream asks for gradients.
    W = [w if w.requires_grad else w.detach().requires_grad_() for w in W]
    S = [torch.zeros_like(w) for w in W] if momentum is None else list(momentum)
    W0 = W
    outs = []
    for t in range(T):
        if t % chunk_size == 0:
            # A fresh view, so autograd.grad below is the partial derivative through the memory
            # only, even when k and v themselves depend on these weights (MAC's retrieved tokens).
            W0 = [w.view_as(w) for w in W]
        if read == "chunk":  # retrieval from the chunk-start weights, a forward pass without update
            outs.append(mlp_forward(W0, q[:, t, :, None, :], activation)[:, :, 0])
        # Eq. 12: l(M; x_t) = ||M(k_t) - v_t||^2, summed over (b, h): each slice of W0 only sees its own.
        pred = mlp_forward(W0, k[:, t, :, None, :], activation)[:, :, 0]
        loss = (pred - v[:, t]).pow(2).sum()
        grads = torch.autograd.grad(loss, W0, create_graph=True)
        if inner_grad_clip:
            # ||g_t||^2 over all layers per (b, h); clamped below at tau^2, so s = 1 (and no gradient
            # through the norm) unless the norm exceeds tau.
            sq = sum(g.pow(2).sum((-1, -2), keepdim=True) for g in grads)
            scale = inner_grad_clip / sq.clamp_min(inner_grad_clip ** 2).sqrt()
            grads = [scale * g for g in grads]
        th, et, al = (g[:, t, :, None, None] for g in (theta, eta, alpha))
        # Eq. 13-14: S_t = eta_t S_{t-1} - theta_t grad; M_t = (1 - alpha_t) M_{t-1} + S_t.
        S = [et * s - th * g for s, g in zip(S, grads)]
        W = [(1 - al) * w + s for w, s in zip(W, S)]
        if read == "token":  # Eq. 15 in the mini-batch form: y_t = M_t(q_t), after token t's update
            outs.append(mlp_forward(W, q[:, t, :, None, :], activation)[:, :, 0])
    return torch.stack(outs, dim=1), (W, S)
