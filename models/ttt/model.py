"""TTT language models: TTT-Linear / TTT-MLP blocks in a Mamba or a transformer backbone.

Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States" (arXiv
2407.04620), block layout of the official ttt-lm-pytorch `Block`:

    mamba backbone:       h = h + CausalConv(RMSNorm(h))        (then as below)
    both:                 h = h + TTTLayer(RMSNorm(h));  h = h + SwiGLU(RMSNorm(h))

The Mamba backbone's TTT layer also shares its Q/K projection behind two convs and gates its
output (models/ttt/layer.py). Differences from the official code: tied embeddings by default and
output projections initialised with std / sqrt(2 * n_layers), as every family here; no KV/decoding
cache (sequences are continued with `initial_states` / `return_final_states` instead).

Axis glossary: B batch, T time, C model width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from titanforge.models.common import RMSNorm, SwiGLU, depth_scaled_std
from titanforge.models.common.lm import CausalLM
from titanforge.models.config import ModelConfig
from titanforge.models.ttt.layer import CausalConv, TTTLayer


class TTTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.ttt
        self.conv_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if t.backbone == "mamba" else None
        self.conv = CausalConv(cfg.d_model, t.conv_kernel) if t.backbone == "mamba" else None
        self.seq_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ttt = TTTLayer(cfg.d_model, cfg.n_heads, t, init_std=cfg.init_std)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_dim, init_std=cfg.init_std)
        self.out_std = depth_scaled_std(cfg.init_std, cfg.n_layers)

    def forward(self, h: torch.Tensor, state: dict | None = None):
        state = state or {}
        new_state = {}
        if self.conv is not None:
            y, new_state["conv"] = self.conv(self.conv_norm(h), state.get("conv"))
            h = h + y
        y, new_state["ttt"] = self.ttt(self.seq_norm(h), state.get("ttt"))
        h = h + y
        return h + self.feed_forward(self.ffn_norm(h)), new_state

    def init_weights(self) -> None:
        for norm in (self.conv_norm, self.seq_norm, self.ffn_norm):
            if norm is not None:
                norm.init_weights()
        if self.conv is not None:
            self.conv.init_weights()
        self.ttt.init_weights(self.out_std)
        self.feed_forward.init_weights(self.out_std)


class TTTModel(CausalLM):
    def __init__(self, cfg: ModelConfig):
        errs = cfg.ttt.validate()
        if errs:
            raise ValueError("; ".join(errs))
        super().__init__(cfg, nn.ModuleDict({str(i): TTTBlock(cfg) for i in range(cfg.n_layers)}))

    def forward(self, tokens: torch.Tensor, initial_states: dict | None = None,
                return_final_states: bool = False):
        """tokens [B, T] -> logits [B, T, V]; with return_final_states, (logits, states) where
        states[str(i)] is layer i's recurrent state, to pass as `initial_states` for the next piece.
        A piece boundary at a multiple of model.ttt.mini_batch_size reproduces one pass exactly."""
        h = self.embed(tokens)
        initial_states = initial_states or {}
        states = {}
        for name, layer in self.layers.items():
            h, states[name] = layer(h, initial_states.get(name))
        h = self.head(h)
        return (h, states) if return_final_states else h

    def flops_per_token(self, seq_len: int) -> float:
        """6N for the matmuls (fwd + bwd) plus 3x the dual-form TTT update per layer.

        The update's cost per token does not grow with seq_len (it is linear-time)."""
        c = self.cfg
        n_params = sum(p.numel() for name, p in self.named_parameters() if "tok_embeddings" not in name)
        if self.output is None:
            n_params += c.vocab_size * c.d_model  # the tied LM head is still a matmul
        inner = sum(layer.ttt.inner_flops_per_token() for layer in self.layers.values())
        return 6.0 * n_params + 3.0 * inner


def build(cfg: ModelConfig) -> TTTModel:
    return TTTModel(cfg)
