"""Building blocks shared by the model families."""

from titanforge.models.common.layers import (
    Attention,
    RMSNorm,
    SwiGLU,
    apply_rope,
    attention,
    depth_scaled_std,
    rope_frequencies,
)

__all__ = ["Attention", "RMSNorm", "SwiGLU", "apply_rope", "attention", "depth_scaled_std", "rope_frequencies"]
