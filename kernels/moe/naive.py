"""References for the MoE permutation: gather rows by expert order, and the weighted combine back.

Axis glossary: N tokens, k experts per token, M kept assignments, C width.
"""

from __future__ import annotations

import torch


def permute_reference(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """x [N, C], order [M] (indices into the flattened [N*k] assignments) -> x[order // k] [M, C]."""
    return x[order // k]


def unpermute_reference(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                        n_tokens: int) -> torch.Tensor:
    """out [N, C]: out[n] = sum over kept slots j of weights[n, j] * y_sorted[row of (n, j)]."""
    k = weights.shape[-1]
    w = weights.reshape(-1)[order].to(y_sorted.dtype)  # [M]
    out = y_sorted.new_zeros(n_tokens, y_sorted.shape[-1])
    return out.index_add(0, order // k, y_sorted * w[:, None])
