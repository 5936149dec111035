"""Config of the TTT family (Sun et al. 2024, arXiv 2407.04620; issue 4).

Width, depth and heads come from the shared `ModelConfig` (d_model, n_layers, n_heads; the SwiGLU
feed-forward uses its ffn_dim); this section holds what is particular to TTT layers.
"""

from __future__ import annotations

from dataclasses import dataclass

INNER_MODELS = ("linear", "mlp")
BACKBONES = ("mamba", "transformer")


@dataclass
class TTTConfig:
    # Inner model f_res: linear (TTT-Linear) | mlp (TTT-MLP, two layers, GELU).
    inner: str = "linear"
    # mamba: causal conv before the TTT layer, shared Q/K projection with separate convs, output
    # gating (the paper's "Mamba backbone") | transformer: plain pre-norm block, separate Q/K.
    backbone: str = "mamba"
    # Tokens per TTT mini-batch b (gradients within one are taken at the previous mini-batch's weights).
    mini_batch_size: int = 16
    # eta_base of the inner learning rate eta(x) = eta_base * sigmoid(theta_lr x) / head_dim;
    # 0 picks the paper's value: 1.0 for linear, 0.1 for mlp.
    base_lr: float = 0.0
    # Hidden width of the TTT-MLP inner model, as a multiple of the head dim (4 in the paper).
    mlp_expansion: int = 4
    # Width of the causal depthwise convolutions of the Mamba backbone.
    conv_kernel: int = 4
    # RoPE on q and k with positions modulo mini_batch_size, as the official code does.
    inner_rope: bool = True
    # Epsilon of the per-head LayerNorm inside the inner model f and of the output LayerNorm.
    ttt_norm_eps: float = 1e-6

    @property
    def eta_base(self) -> float:
        if self.base_lr:
            return self.base_lr
        return 1.0 if self.inner == "linear" else 0.1

    def validate(self) -> list[str]:
        """Return human-readable problems (empty when consistent)."""
        errs = []
        if self.inner not in INNER_MODELS:
            errs.append(f"model.ttt.inner={self.inner!r} is not one of {INNER_MODELS}")
        if self.backbone not in BACKBONES:
            errs.append(f"model.ttt.backbone={self.backbone!r} is not one of {BACKBONES}")
        if self.mini_batch_size < 1:
            errs.append(f"model.ttt.mini_batch_size={self.mini_batch_size} must be >= 1 (16 in the paper)")
        if self.base_lr < 0:
            errs.append(f"model.ttt.base_lr={self.base_lr} must be >= 0 (0 picks the paper's default)")
        if self.mlp_expansion < 1:
            errs.append(f"model.ttt.mlp_expansion={self.mlp_expansion} must be >= 1 (4 in the paper)")
        if self.conv_kernel < 1:
            errs.append(f"model.ttt.conv_kernel={self.conv_kernel} must be >= 1 (4 in the paper)")
        return errs
