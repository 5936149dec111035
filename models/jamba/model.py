"""Jamba-style hybrid decoder: Mamba and attention mixers, dense and MoE feed-forwards.

Follows Jamba (Lieber et al. 2024, arXiv 2403.19887): pre-norm residual layers, each a token
mixer (Mamba-1 with RMSNorm on Δ/B/C, or grouped-query attention WITHOUT positional encoding,
the Mamba layers carrying position) followed by a feed-forward (SwiGLU or a top-k MoE of SwiGLU
experts); the per-layer choice comes from `model.jamba.layer_pattern` (models/common/pattern.py).
Weight layout matches Hugging Face `JambaForCausalLM` (models/jamba/hf.py maps names).

Deliberate differences from the paper: top-4 of 16 experts by default (DBRX-like; Jamba v0.1
uses top-2); a Mamba-2 (SSD) mixer is available as a pattern option; embeddings may be tied;
output projections of residual branches are initialised with std / sqrt(2 * n_layers).

Axis glossary: B batch, T time, C model width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from titanforge.models.common import Attention, RMSNorm, SwiGLU, depth_scaled_std
from titanforge.models.common.lm import CausalLM
from titanforge.models.common.mamba import Mamba2Mixer, MambaMixer
from titanforge.models.common.moe import MoE
from titanforge.models.common.pattern import LayerSpec, parse_layer_pattern
from titanforge.models.config import ModelConfig

SUPPORTED_MIXERS = ("mamba", "mamba2", "attention")


def build_mixer(cfg: ModelConfig, kind: str) -> nn.Module:
    j = cfg.jamba
    if kind == "mamba":
        return MambaMixer(cfg.d_model, j.d_state, j.d_conv, j.expand, j.dt_rank, norm_eps=cfg.norm_eps,
                          init_std=cfg.init_std, chunk_size=j.scan_chunk_size)
    if kind == "mamba2":
        return Mamba2Mixer(cfg.d_model, j.d_state, j.d_conv, j.expand, j.mamba2_headdim, j.mamba2_groups,
                           norm_eps=cfg.norm_eps, init_std=cfg.init_std, chunk_size=j.chunk_size)
    if kind == "attention":
        return Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, init_std=cfg.init_std)
    raise ValueError(f"mixer {kind!r} is not built by the jamba family; use one of {SUPPORTED_MIXERS}")


def build_ffn(cfg: ModelConfig, kind: str) -> nn.Module | None:
    if kind == "mlp":
        return SwiGLU(cfg.d_model, cfg.ffn_dim, init_std=cfg.init_std)
    if kind == "moe":
        return MoE(cfg.d_model, cfg.ffn_dim, cfg.jamba.moe, init_std=cfg.init_std)
    return None


class JambaBlock(nn.Module):
    """x + mixer(norm(x)), then x + feed_forward(norm(x)) (the second step absent for ffn 'none')."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(cfg, spec.mixer)
        self.feed_forward = build_ffn(cfg, spec.ffn)
        self.pre_ff_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps) if self.feed_forward is not None else None
        self.out_std = depth_scaled_std(cfg.init_std, cfg.n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Attention gets no rotary table (freqs=None): Jamba uses no positional encoding.
        x = x + self.mixer(self.input_layernorm(x))
        if self.feed_forward is not None:
            x = x + self.feed_forward(self.pre_ff_layernorm(x))
        return x

    def init_weights(self) -> None:
        self.input_layernorm.init_weights()
        self.mixer.init_weights(self.out_std)
        if self.feed_forward is not None:
            self.pre_ff_layernorm.init_weights()
            self.feed_forward.init_weights(self.out_std)

    def flops_per_token(self, seq_len: int) -> float:
        if isinstance(self.mixer, Attention):
            # 6N for the projections plus causal scores and values (PaLM appendix B, as Llama here).
            mix = 6.0 * sum(p.numel() for p in self.mixer.parameters()) + 6.0 * seq_len * self.mixer.wq.weight.shape[0]
        else:
            mix = self.mixer.flops_per_token()
        if isinstance(self.feed_forward, MoE):
            ffn = self.feed_forward.flops_per_token()
        elif self.feed_forward is not None:
            ffn = 6.0 * sum(p.numel() for p in self.feed_forward.parameters())
        else:
            ffn = 0.0
        return mix + ffn


class Jamba(CausalLM):
    def __init__(self, cfg: ModelConfig):
        errs = cfg.jamba.moe.validate()
        if errs:
            raise ValueError("invalid model.jamba.moe: " + "; ".join(errs))
        specs = parse_layer_pattern(cfg.jamba.layer_pattern, cfg.n_layers, allowed_mixers=SUPPORTED_MIXERS)
        super().__init__(cfg, nn.ModuleDict({str(i): JambaBlock(cfg, s) for i, s in enumerate(specs)}))
        self.specs = specs
        # The load-balancing loss pools all MoE layers (HF); a pipeline stage keeps this count.
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        for m in moes:
            m.pooled_layers = len(moes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V]. MoE layers leave their z-losses in `aux_losses`
        and their routing stats for the pooled balance loss (`models.registry.collect_aux_losses`)."""
        h = self.embed(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.head(h)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: every layer's mixer and feed-forward (MoE: k active experts)
        plus the LM head."""
        c = self.cfg
        return sum(layer.flops_per_token(seq_len) for layer in self.layers.values()) + 6.0 * c.vocab_size * c.d_model


def build(cfg: ModelConfig) -> Jamba:
    return Jamba(cfg)
