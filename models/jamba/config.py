"""Config of the Jamba hybrid family (arXiv 2403.19887): layer pattern, Mamba and MoE settings.

Attention layers take `model.n_heads` / `model.n_kv_heads` and no positional encoding; dense
feed-forwards take `model.ffn_dim`; experts take `model.jamba.moe.expert_hidden` (0 = ffn_dim).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from titanforge.models.common.moe import MoEConfig


def _jamba_moe() -> MoEConfig:
    # Jamba: 16 experts, softmax over all, raw top-k weights, load-balancing loss 1e-3, no z-loss
    # (this project routes to 4 experts as DBRX; Jamba v0.1 used 2).
    return MoEConfig(n_experts=16, top_k=4, topk_norm="none", load_balance_coef=1e-3, z_loss_coef=0.0)


@dataclass
class JambaConfig:
    # One block of layers, two letters per layer: mixer (M Mamba-1, S Mamba-2, A attention) then
    # feed-forward (D dense SwiGLU, E MoE, - none); repeated to model.n_layers. Grammar in
    # models/common/pattern.py. Default: Jamba's block, attention at offset 4, MoE on odd layers.
    layer_pattern: str = "MD ME MD ME AD ME MD ME"
    # Mamba state size N, causal conv width, inner width = expand * d_model.
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    # Rank of the Δ projection; 0 = ceil(d_model / 16) (Mamba, Jamba).
    dt_rank: int = 0
    # Chunk length of the Mamba-2 (S) chunked SSD (speed only; results do not depend on it).
    chunk_size: int = 64
    # Chunk length of the Mamba-1 (M) selective scan; 0 = the whole sequence, a sequential loop
    # over T, run by the fused C loop on CPU (kernels/mamba/fused_cpu.py). Speed only.
    scan_chunk_size: int = 0
    # Mamba-2 (S) layers: head dim and number of B/C groups.
    mamba2_headdim: int = 32
    mamba2_groups: int = 1
    moe: MoEConfig = field(default_factory=_jamba_moe)
