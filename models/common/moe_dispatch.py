"""Token dispatch for the Mixture-of-Experts layer: sort by expert, compute, combine.

The pieces are separate functions so that `parallel/` can put an all-to-all between dispatch and
compute (expert parallelism) without touching the model:

    order, counts = sort_tokens_by_expert(expert_ids, n_experts)      # [N*k], [E]
    order, counts, dropped = apply_capacity(order, counts, capacity)   # optional
    x_sorted = permute(x, order, k)                                    # [M, C], segments per expert
    (all-to-all of the segments to the ranks that own the experts goes here)
    y_sorted = expert_forward(x_sorted, counts, w1, w3, w2)            # [M, C]
    (reverse all-to-all)
    y = combine(y_sorted, order, weights, n_tokens)                    # [N, C]

The layout is the one grouped GEMMs consume (Megablocks, torchtitan): assignments sorted by
expert id into contiguous segments, `counts[e]` rows for expert e, experts' weights stacked as
`[E, C, H]` / `[E, H, C]`. A stable sort keeps, within each expert, the assignments in token
order; the capacity rule relies on that (first come, first served, as Switch Transformer).

Axis glossary: N tokens, k experts per token, E experts, M kept assignments (N*k when dropless),
C model width, H expert hidden width.
"""

from __future__ import annotations

import itertools
import math

import torch

from titanforge.kernels.moe import permute, unpermute
from titanforge.kernels.pointwise import swiglu

# torch._grouped_mm runs on CPU in torch 2.13 for float32/bfloat16/float16 when every row stride is
# a multiple of 16 bytes (checked); it rejects float64 and odd widths, where the loop takes over.
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sort_tokens_by_expert(expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group token-expert assignments by expert.

    expert_ids: [N, k] (or flat [N*k]) chosen expert per token and slot.
    Returns `order` [N*k] int64, indices into the flattened assignments such that
    `expert_ids.flatten()[order]` is sorted ascending, ties in token order (stable sort); and
    `counts` [E] int64, the number of assignments per expert (segment lengths).
    Token of assignment `order[i]` is `order[i] // k`.
    """
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return order, counts


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * N * k / E), the most assignments one expert takes (GShard, Switch)."""
    # The epsilon keeps float noise (1.1 * 10 = 11.000000000000002) from adding a slot.
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts - 1e-9))


def apply_capacity(order: torch.Tensor, counts: torch.Tensor,
                   capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most `capacity` assignments per expert: the first ones in token order.

    Drop rule (deterministic, documented): within each expert the assignments are ranked by token
    index (the stable sort of `sort_tokens_by_expert`), and those ranked `capacity` or later are
    dropped; a dropped assignment contributes zero to its token's output (the residual carries the
    token). This is Switch Transformer's rule and what Megatron's `drop_policy="position"` intends;
    Megatron picks among equal mask values with torch.topk, which on CPU kept later positions.
    Returns the kept `order` [M], kept `counts` [E] and the number of dropped assignments (0-dim).
    """
    offsets = torch.cumsum(counts, 0) - counts  # [E] start of each segment
    expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    rank_in_expert = torch.arange(order.numel(), device=order.device) - offsets[expert_of_row]
    keep = rank_in_expert < capacity
    kept_counts = counts.clamp(max=capacity)
    dropped = counts.sum() - kept_counts.sum()
    return order[keep], kept_counts, dropped


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch._grouped_mm's CPU backward rejects stride-0 (expanded) gradients such as those of
    `y.sum()`; this keeps expert_forward usable on its own.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _can_grouped_mm(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    row_bytes = 16 // x.element_size()
    return all(w.dtype == x.dtype and w.shape[-1] % row_bytes == 0 and w.shape[-2] % row_bytes == 0
               for w in weights)


def _segment_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int] | None,
                offs: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] rows grouped by `counts`, w [E, K, N] -> [M, N]: x[segment e] @ w[e]."""
    if offs is not None:
        return torch._grouped_mm(x, w, offs=offs)
    starts = itertools.accumulate(counts, initial=0)
    outs = [x[start:start + n] @ w[e] for e, (start, n) in enumerate(zip(starts, counts)) if n]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


def expert_forward(x_sorted: torch.Tensor, counts: torch.Tensor | list[int], w1: torch.Tensor,
                   w3: torch.Tensor, w2: torch.Tensor, *, grouped_mm: bool | None = None) -> torch.Tensor:
    """SwiGLU experts on expert-sorted rows: row x in segment e -> (silu(x w1[e]) * (x w3[e])) w2[e].

    x_sorted: [M, C], rows of expert e contiguous, `counts[e]` of them, experts in order 0..E-1.
    w1, w3: [E, C, H]; w2: [E, H, C] (E may be the local experts of an expert-parallel rank).
    grouped_mm: None = use torch._grouped_mm where it runs (dtype and 16-byte strides), else a loop
    over experts; True/False force one path (True raises if it cannot run).
    Returns [M, C] in the same row order. The grouped path does not check on the host that the
    counts sum to M (that would synchronise); the loop path does.
    """
    E = w1.shape[0]
    n_counts = counts.numel() if torch.is_tensor(counts) else len(counts)
    if n_counts != E:
        raise ValueError(f"expert_forward: counts has {n_counts} entries but the weights hold {E} experts")
    usable = _can_grouped_mm(x_sorted, w1, w3, w2)
    if grouped_mm and not usable:
        raise ValueError("expert_forward(grouped_mm=True): torch._grouped_mm needs float32/bf16/fp16 "
                         "and widths whose rows are multiples of 16 bytes; pass grouped_mm=None")
    offs, counts_list = None, None
    if usable and grouped_mm is not False:
        # Offsets stay on the device: the grouped path needs no host synchronisation.
        counts_t = counts if torch.is_tensor(counts) else torch.tensor(counts)
        offs = counts_t.to(x_sorted.device).cumsum(0).to(torch.int32)
        x_sorted = x_sorted.contiguous()
    else:
        counts_list = counts.tolist() if torch.is_tensor(counts) else list(counts)
        if sum(counts_list) != x_sorted.shape[0]:
            raise ValueError(f"expert_forward: counts sum to {sum(counts_list)} but x_sorted has "
                             f"{x_sorted.shape[0]} rows")
    h = swiglu(_segment_mm(x_sorted, w1, counts_list, offs), _segment_mm(x_sorted, w3, counts_list, offs))
    y = _segment_mm(h, w2, counts_list, offs)
    return _ContiguousGrad.apply(y) if offs is not None else y


def combine(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs, back in token order.

    y_sorted: [M, C] expert outputs in the order of `order`; order: [M] indices into the flattened
    [N*k] assignments (dropped assignments simply absent); weights: [N, k] router weights.
    Returns [N, C]: out[n] = sum over kept slots j of weights[n, j] * y(n, j).
    """
    # One Triton gather on CUDA (weights applied in the same pass), index_add elsewhere (kernels/moe).
    return unpermute(y_sorted, order, weights, n_tokens)
