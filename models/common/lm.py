"""The parts every causal language model here shares: token embedding, final norm, LM head.

Each family subclasses `CausalLM`, passes its own `layers` (an nn.ModuleDict keyed str(i)) and
writes its forward as embed -> its layers -> `head`. The attribute names (`tok_embeddings`,
`norm`, `output`) are what the tensor-parallel plans, the Hugging Face mappings and checkpoints
use. A pipeline stage sets `tok_embeddings` or `norm` to None and then passes hidden states in
or out instead of tokens or logits.
"""

from __future__ import annotations

import torch
from torch import nn

from titanforge.kernels.loss import linear_cross_entropy
from titanforge.models.common.layers import RMSNorm, rope_frequencies
from titanforge.models.config import ModelConfig


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: nn.ModuleDict, *, rope: bool = False):
        super().__init__()
        self.cfg = cfg
        # Registration order embeddings, layers, norm, head: parameter order (state dicts,
        # optimizer state, seeded re-initialisations) is the same in every family.
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = layers
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Tied by default (small models): the LM head reuses the embedding matrix.
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Rotary table for families with positional attention. Not in the state dict: it is
        # derived from the config, and checkpoints stay small.
        # Set by the trainer around a forward (train.fused_cross_entropy): `head` then returns the
        # mean cross-entropy of these targets [B, T] instead of logits.
        self.loss_targets: torch.Tensor | None = None
        if rope:
            self.register_buffer("freqs", rope_frequencies(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta),
                                 persistent=False)
        else:
            self.freqs = None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> hidden [B, T, C]; a stage without the embedding passes hidden states on."""
        if self.freqs is not None and tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        return self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, C] -> logits [B, T, V]; a stage without the final norm returns h; with
        `loss_targets` set, the mean cross-entropy against them (no logits formed, kernels/loss)."""
        if self.norm is None:
            return h
        h = self.norm(h)
        weight = self.output.weight if self.output is not None else self.tok_embeddings.weight
        if self.loss_targets is not None:
            return linear_cross_entropy(h, weight, self.loss_targets)
        return h @ weight.t()

    def init_weights(self) -> None:
        """Embeddings N(0, init_std), every layer's own init, norm gains 1, untied head truncated normal;
        the rotary table is recomputed (after a meta-device build it holds no values)."""
        if self.freqs is not None:
            with torch.no_grad():
                self.freqs.copy_(rope_frequencies(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                                                  device=self.freqs.device))
        nn.init.normal_(self.tok_embeddings.weight, std=self.cfg.init_std)
        for layer in self.layers.values():
            layer.init_weights()
        self.norm.init_weights()
        if self.output is not None:
            nn.init.trunc_normal_(self.output.weight, std=self.cfg.init_std)
