"""Llama-style decoder: the baseline every other family is compared against.

Follows Llama 2/3 (Touvron et al. 2023): pre-norm RMSNorm, rotary position embeddings, SwiGLU
feed-forward, grouped-query attention through `scaled_dot_product_attention`, optionally over a
sliding window (`model.attention_window`, as Mistral; the window-only long-context baseline). Weight layout and
the rotate-half RoPE convention match Hugging Face `LlamaForCausalLM`, so weights map one to one
(`models/llama/hf.py`). Differences from Llama: embeddings may be tied (default, small models),
and output projections of residual branches are initialised with std / sqrt(2 * n_layers).

Axis glossary: B batch, T time, C model width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from titanforge.models.common import Attention, RMSNorm, SwiGLU, depth_scaled_std
from titanforge.models.common.lm import CausalLM
from titanforge.models.config import ModelConfig


def sliding_window_mask(T: int, window: int, device) -> torch.Tensor | None:
    """bool [T, T], True where query i may attend key j: i - window < j <= i; None for window 0
    or a window that covers the whole sequence (plain causal attention)."""
    if window <= 0 or window >= T:
        return None
    i = torch.arange(T, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, init_std=cfg.init_std)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_dim, init_std=cfg.init_std)
        self.out_std = depth_scaled_std(cfg.init_std, cfg.n_layers)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), freqs, attn_mask=mask)
        return x + self.feed_forward(self.ffn_norm(x))

    def init_weights(self) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(self.out_std)
        self.feed_forward.init_weights(self.out_std)


class Llama(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, nn.ModuleDict({str(i): LlamaBlock(cfg) for i in range(cfg.n_layers)}), rope=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        mask = sliding_window_mask(h.shape[1], self.cfg.attention_window, h.device)
        for layer in self.layers.values():
            h = layer(h, self.freqs, mask)
        return self.head(h)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the weights plus 6 * L * T * C for attention.

        N counts every non-embedding parameter (norm gains included, as in Kaplan et al.) plus the
        LM head. Attention: QK^T and AV cost 2 * 2 * C flops per (query, key) pair; a causal query
        sees T/2 keys on average, and backward costs twice forward, so 3 * 4 * C * T/2 per layer.
        PaLM (appendix B) writes 12 * L * T * C because it ignores the causal mask.
        """
        c = self.cfg
        n_params = sum(p.numel() for name, p in self.named_parameters() if "tok_embeddings" not in name)
        if self.output is None:
            n_params += c.vocab_size * c.d_model  # the tied LM head is still a matmul
        return 6.0 * n_params + 6.0 * c.n_layers * seq_len * c.d_model


def build(cfg: ModelConfig) -> Llama:
    return Llama(cfg)
