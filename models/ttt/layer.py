"""The TTT sequence-mixing layer (TTT-Linear / TTT-MLP) and the causal depthwise convolution.

Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States" (arXiv
2407.04620). The hidden state is the per-head weights of an inner model f(x) = x + LN(f_res(x)),
trained online on 1/2 ||f(theta_K x) - theta_V x||^2 with mini-batch TTT; the output is
f(theta_Q x) followed by a LayerNorm, optional gating and the output projection. The update itself
is `kernels/ttt` (dual form). Details follow the official ttt-lm-pytorch code (TTTBase, TTTLinear,
TTTMLP), not only the paper:
- eta_j = eta_base * sigmoid(theta_lr x_j + bias) / head_dim per head, times a per-position
  factor token_eta[i] = max(0, 1/(i+1) + learnable offset) within each mini-batch;
- RoPE on q and k with positions modulo the mini-batch size (`inner_rope`);
- Mamba backbone: one shared Q/K projection followed by separate causal convs for q and k, and
  an output gate GELU_tanh(theta_G x) * LayerNorm(z).
Deliberate differences: RoPE uses the rotate-half pairing of models/common (the official code
permutes to the interleaved JAX pairing; with learned projections the two are equivalent up to a
fixed permutation), and the convs carry their last kernel-1 inputs as state so a sequence can be
split exactly. State = {"inner": weights and biases of f_res, "conv_q"/"conv_k": conv history}.

Axis glossary: B batch, T time, C model width, H heads, D head dim, F inner MLP width, b mini-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titanforge.kernels.ttt import chunk_ttt_linear, chunk_ttt_mlp
from titanforge.models.common import apply_rope, rope_frequencies
from titanforge.models.ttt.config import TTTConfig


class CausalConv(nn.Module):
    """Depthwise causal conv over time with bias; carries its last kernel-1 inputs as state."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, bias=True)

    def forward(self, x: torch.Tensor, history: torch.Tensor | None = None):
        # x [B, T, C]; history [B, kernel-1, C] (zeros at the start of a sequence).
        B, T, C = x.shape
        if history is None:
            history = x.new_zeros(B, self.kernel - 1, C)
        xp = torch.cat([history, x], dim=1)  # [B, T + kernel - 1, C]
        # groups from the input, not the module: a tensor-parallel shard convolves its channels only.
        y = F.conv1d(xp.transpose(1, 2), self.conv.weight, self.conv.bias, groups=C).transpose(1, 2)
        return y, xp[:, xp.shape[1] - (self.kernel - 1):]

    def init_weights(self) -> None:
        self.conv.reset_parameters()


class TTTLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, cfg: TTTConfig, *, init_std: float = 0.02):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"TTT width {dim} is not divisible by n_heads={n_heads}")
        self.cfg = cfg
        self.head_dim = D = dim // n_heads
        if cfg.inner_rope and D % 2:
            raise ValueError(f"model.ttt.inner_rope needs an even head dim, got {D}; "
                             "change d_model/n_heads or set model.ttt.inner_rope=false")
        self.init_std = init_std
        self.mamba = cfg.backbone == "mamba"
        b = cfg.mini_batch_size
        self.q_proj = nn.Linear(dim, dim, bias=False)
        # The Mamba backbone shares one Q/K projection and tells q from k by separate convs.
        self.k_proj = None if self.mamba else nn.Linear(dim, dim, bias=False)
        self.conv_q = CausalConv(dim, cfg.conv_kernel) if self.mamba else None
        self.conv_k = CausalConv(dim, cfg.conv_kernel) if self.mamba else None
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.g_proj = nn.Linear(dim, dim, bias=False) if self.mamba else None
        self.o_proj = nn.Linear(dim, dim, bias=False)
        # theta_lr per head: [H, C] and [H].
        self.lr_weight = nn.Parameter(torch.empty(n_heads, dim))
        self.lr_bias = nn.Parameter(torch.empty(n_heads))
        self.learnable_token_idx = nn.Parameter(torch.empty(b))
        self.register_buffer("token_idx", torch.empty(b), persistent=False)
        self.register_buffer("freqs", torch.empty(b, D // 2, 2), persistent=False)
        # Inner LayerNorm and initial inner weights W_0, per head.
        self.ttt_norm_weight = nn.Parameter(torch.empty(n_heads, D))
        self.ttt_norm_bias = nn.Parameter(torch.empty(n_heads, D))
        if cfg.inner == "linear":
            self.W1 = nn.Parameter(torch.empty(n_heads, D, D))
            self.b1 = nn.Parameter(torch.empty(n_heads, D))
            self.W2 = self.b2 = None
        else:
            Fh = cfg.mlp_expansion * D
            self.W1 = nn.Parameter(torch.empty(n_heads, D, Fh))
            self.b1 = nn.Parameter(torch.empty(n_heads, Fh))
            self.W2 = nn.Parameter(torch.empty(n_heads, Fh, D))
            self.b2 = nn.Parameter(torch.empty(n_heads, D))
        self.post_norm = nn.LayerNorm(dim, eps=cfg.ttt_norm_eps)

    def initial_inner_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        """W_0 (and biases) expanded over the batch: the inner state at t = 0."""
        params = [self.W1, self.b1] + ([self.W2, self.b2] if self.W2 is not None else [])
        return tuple(p.unsqueeze(0).expand(batch, *p.shape) for p in params)

    def forward(self, x: torch.Tensor, state: dict | None = None):
        """x [B, T, C] -> (y [B, T, C], final state). `state` is a previous call's final state."""
        B, T, C = x.shape
        state = state or {}
        D = self.head_dim
        # Heads from the weight shapes, so a tensor-parallel shard with fewer heads runs as is.
        H = self.W1.shape[0]
        new_state = {}
        if self.mamba:
            shared = self.q_proj(x)
            q, new_state["conv_q"] = self.conv_q(shared, state.get("conv_q"))
            k, new_state["conv_k"] = self.conv_k(shared, state.get("conv_k"))
        else:
            q, k = self.q_proj(x), self.k_proj(x)
        q, k, v = (t.reshape(B, T, H, D) for t in (q, k, self.v_proj(x)))
        if self.cfg.inner_rope:
            # Positions restart every mini-batch; pieces split at multiples of b stay aligned.
            pos = torch.arange(T, device=x.device) % self.cfg.mini_batch_size
            freqs = self.freqs[pos]
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        # eta [B, T, H]: learnable token-dependent inner learning rate, scaled by 1/D as upstream.
        eta = self.cfg.eta_base * torch.sigmoid(x @ self.lr_weight.t() + self.lr_bias) / D
        token_eta = (self.token_idx + self.learnable_token_idx).clamp_min(0.0)
        inner = state.get("inner") or self.initial_inner_state(B)
        op = chunk_ttt_linear if self.W2 is None else chunk_ttt_mlp
        z, new_state["inner"] = op(q, k, v, eta, token_eta, self.ttt_norm_weight, self.ttt_norm_bias,
                                   inner, eps=self.cfg.ttt_norm_eps)
        z = self.post_norm(z.reshape(B, T, H * D))
        if self.g_proj is not None:
            z = F.gelu(self.g_proj(x), approximate="tanh") * z
        return self.o_proj(z), new_state

    @torch.no_grad()
    def init_weights(self, out_std: float | None = None) -> None:
        b, D = self.cfg.mini_batch_size, self.head_dim
        self.token_idx.copy_(1.0 / torch.arange(1, b + 1, dtype=torch.float32, device=self.token_idx.device))
        self.freqs.copy_(rope_frequencies(D - D % 2, b, device=self.freqs.device))
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, std=self.init_std)
        nn.init.normal_(self.o_proj.weight, std=out_std or self.init_std)
        for conv in (self.conv_q, self.conv_k):
            if conv is not None:
                conv.init_weights()
        # As upstream: theta_lr ~ N(0, 0.02), bias 0, per-position offsets 0, W ~ N(0, 0.02), b = 0.
        nn.init.normal_(self.lr_weight, std=0.02)
        nn.init.zeros_(self.lr_bias)
        nn.init.zeros_(self.learnable_token_idx)
        nn.init.ones_(self.ttt_norm_weight)
        nn.init.zeros_(self.ttt_norm_bias)
        for w in (self.W1, self.W2):
            if w is not None:
                nn.init.normal_(w, std=0.02)
        for bias in (self.b1, self.b2):
            if bias is not None:
                nn.init.zeros_(bias)
        self.post_norm.reset_parameters()

    def inner_flops_per_token(self) -> float:
        """Forward FLOPs of the TTT update per token (dual form, approximate)."""
        H, D, b = self.W1.shape[0], self.head_dim, self.cfg.mini_batch_size
        if self.W2 is None:
            # k W, q W, the W update, and the two [b, b] products (Q K^T, A G).
            return H * (3 * 2 * D * D + 2 * 2 * b * D)
        Fh = self.W1.shape[-1]
        # k W1, q W1, G2 W2^T, X2 W2, X2_bar W2 and both updates; two [b, b] products per layer.
        return H * (7 * 2 * D * Fh + 2 * 2 * b * (D + Fh))

