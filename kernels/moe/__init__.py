"""MoE token permutation by expert and the un-permutation fused with the routing weights.

`permute(x, order, k)` is x[order // k] (rows grouped by expert, the grouped GEMM's layout);
`unpermute(y_sorted, order, weights, n_tokens)` is each token's routing-weighted sum of its expert
outputs. On CUDA (kernels/dispatch.py) both run as Triton gathers over the inverse permutation
(triton.py): every output row is written by one program, so neither pass nor its backward needs
atomics or a scatter, and the weights are applied in the same pass (no [M, C] weighted copy).
Elsewhere the PyTorch formulas of naive.py run. The expert GEMMs themselves go through
torch._grouped_mm where the device supports it (models/common/moe_dispatch.py).
"""

from __future__ import annotations

import torch

from titanforge.kernels.dispatch import pick
from titanforge.kernels.moe.naive import permute_reference, unpermute_reference

__all__ = ["permute", "unpermute", "permute_reference", "unpermute_reference"]


def permute(x: torch.Tensor, order: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """x [N, C], order [M] int64 (assignment indices, each < N*k, no repeats) -> [M, C]."""
    if pick("moe_permute", backend, x) == "triton" and order.numel() and x.numel():
        from titanforge.kernels.moe.triton import permute_triton

        return permute_triton(x, order, k)
    return permute_reference(x, order, k)


def unpermute(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, n_tokens: int,
              backend: str = "auto") -> torch.Tensor:
    """y_sorted [M, C], order [M], weights [N, k] -> [N, C] (dropped assignments contribute nothing)."""
    if weights.shape[0] != n_tokens or order.shape[0] != y_sorted.shape[0]:
        raise ValueError(f"unpermute: weights {tuple(weights.shape)} must be [n_tokens={n_tokens}, k] and order "
                         f"{tuple(order.shape)} hold one index per row of y_sorted {tuple(y_sorted.shape)}")
    if pick("moe_permute", backend, y_sorted, weights) == "triton" and y_sorted.numel():
        from titanforge.kernels.moe.triton import unpermute_triton

        return unpermute_triton(y_sorted, order, weights, n_tokens)
    return unpermute_reference(y_sorted, order, weights, n_tokens)
