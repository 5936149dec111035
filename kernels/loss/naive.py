"""Reference for the fused linear + cross-entropy: the full [tokens, vocab] logits, then F.cross_entropy.

Axis glossary: M tokens, C model width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100) -> torch.Tensor:
    """mean over tokens with targets != ignore_index of -log softmax(x W^T)[target]; x [M, C],
    weight [V, C], targets [M]; the logits in at least float32."""
    logits = x @ weight.t()
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           ignore_index=ignore_index)
