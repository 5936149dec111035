"""Layers shared by every model family: RMSNorm, rotary embeddings, SwiGLU, attention.

Plain single-device PyTorch (see STYLE.md section 2). Attention runs through
`scaled_dot_product_attention` with grouped-query heads; masks other than causal (sliding
windows, persistent prefixes) are built by the caller and passed in as a boolean `attn_mask`.

Axis glossary: B batch, T time, H query heads, G key/value heads, D head dim, C model width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from titanforge.kernels.norms import rms_norm
from titanforge.kernels.pointwise import rope, swiglu


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in at least float32 (Llama; Zhang & Sennrich 2019).

    Low-precision inputs are upcast to float32; float64 stays float64 so float64 reference tests
    are not limited to float32 precision.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x) * weight, times `gate` (broadcastable to x) when given, in the same pass. One
        fused C loop each way on CPU float32/float64, the plain formulas elsewhere (kernels/norms)."""
        return rms_norm(x, self.weight, self.eps, gate)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


def rope_frequencies(head_dim: int, max_seq_len: int, theta: float = 10000.0,
                     device: torch.device | None = None) -> torch.Tensor:
    """cos/sin table, [T, D/2, 2] float32, for the rotate-half convention of Hugging Face Llama."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}; "
                         f"choose d_model / n_heads even")
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    ang = torch.outer(t, inv)
    return torch.stack([ang.cos(), ang.sin()], dim=-1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by freqs [T, D/2, 2] (rotate-half layout: pairs (i, i + D/2)). One fused
    C loop each way on CPU float32/float64, the formulas elsewhere; kernels/pointwise checks that
    the table covers x."""
    return rope(x, freqs)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020), the Llama feed-forward."""

    def __init__(self, dim: int, hidden: int, init_std: float = 0.02):
        super().__init__()
        self.init_std = init_std
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))  # silu(a) * b fused on CPU (kernels/pointwise)

    def init_weights(self, out_std: float | None = None) -> None:
        for lin in (self.w1, self.w3):
            nn.init.trunc_normal_(lin.weight, std=self.init_std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std or self.init_std)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query attention. q [B, T, H, D], k/v [B, S, G, D] with H % G == 0 -> [B, T, H, D].

    `attn_mask` (bool, True = attend) of shape [T, S] or broadcastable to [B, H, T, S] replaces
    the causal mask when given.
    """
    H, G = q.shape[2], k.shape[2]
    if H % G:
        raise ValueError(f"{H} query heads are not a multiple of {G} key/value heads")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H|G, T, D]
    # enable_gqa lets SDPA share each key/value head across its query group without copying
    # k and v H/G times (same result as repeat_interleave, less memory and time).
    gqa = G != H
    if attn_mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with optional RoPE (Jamba uses none)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, *, init_std: float = 0.02,
                 bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.init_std = init_std
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None = None, *,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # Heads are read from the weight shapes, so a tensor-parallel shard (fewer local heads)
        # runs the same code.
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if freqs is not None:
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        out = attention(q, k, v, attn_mask=attn_mask)
        return self.wo(out.reshape(B, T, -1))

    def init_weights(self, out_std: float | None = None) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, std=self.init_std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std or self.init_std)
        for lin in (self.wq, self.wk, self.wv, self.wo):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)


def depth_scaled_std(init_std: float, n_layers: int) -> float:
    """Output projections of residual branches get std / sqrt(2 * n_layers) (GPT-2, Megatron)."""
    return init_std / math.sqrt(2 * n_layers)
