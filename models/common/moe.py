"""Mixture-of-Experts feed-forward: top-k softmax router, SwiGLU experts, sorted (dropless) dispatch.

Follows Jamba (arXiv 2403.19887) and the routers it descends from: the router runs in float32,
softmax over ALL experts, top-k; the chosen probabilities are used raw (Jamba, `topk_norm="none"`)
or renormalised over the k chosen (Mixtral, `"renormalize"`; DBRX's `"l1"` is the same thing for
nonnegative weights and kept as an alias). Auxiliary losses:

- load balance, Hugging Face's `load_balancing_loss_func` (Jamba, Mixtral; Switch Transformer
  eq. 4 without the 1/k): E * sum_e f_e * P_e with f_e = (top-k assignments routed to e) / rows
  and P_e = mean over rows of the FULL softmax probability of e; the rows are the tokens of ALL
  MoE layers pooled (HF concatenates the layers' router logits). f_e sums to k, so the loss is k
  at perfect balance; f_e carries no gradient, P_e does. `load_balance_coef` is HF's
  `router_aux_loss_coef`. Megatron's `switch_load_balancing_loss_func` divides f by k and is
  summed per layer: at one layer ours is k times it. Each MoE keeps its (counts, probability
  sums, rows) in `balance_stats`; `pooled_load_balance` pools the modules of a model, and
  `models.registry.collect_aux_losses` adds it, weighted, as one "load_balance" term.
- router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2, per layer, multiplied by
  its coefficient and stored in `self.aux_losses` after each forward.

Unweighted per-layer values, dropped assignments and the expert-load histogram are in
`self.metrics`.

Deliberate differences: dispatch is dropless by default (Megablocks) rather than Switch's fixed
capacity; with `capacity_factor > 0`, assignments over capacity are dropped in token order (see
`moe_dispatch.apply_capacity`) and the kept weights are NOT renormalised. The auxiliary losses are
computed over all tokens of the micro-batch (not per sequence), before any dropping.

Axis glossary: B batch, T time, N = B*T tokens, C model width, E experts, k experts per token,
H expert hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from titanforge.kernels.moe import permute
from titanforge.models.common.moe_dispatch import (
    apply_capacity,
    combine,
    expert_capacity,
    expert_forward,
    sort_tokens_by_expert,
)

TOPK_NORMS = ("none", "renormalize", "l1")

__all__ = [
    "MoEConfig", "MoE", "TopKRouter", "GroupedExperts", "RouterOutput", "BalanceStats", "load_balancing_loss",
    "balance_stats", "pooled_load_balance",
    "router_z_loss", "sort_tokens_by_expert", "apply_capacity", "expert_capacity", "expert_forward",
    "combine", "TOPK_NORMS",
]


@dataclass
class MoEConfig:
    n_experts: int = 16
    top_k: int = 4
    # SwiGLU hidden width per expert; 0 = the model's ffn_dim (the `hidden` passed to MoE).
    expert_hidden: int = 0
    # none (Jamba: raw softmax probabilities of the chosen experts) | renormalize (Mixtral: top-k
    # weights divided by their sum) | l1 (DBRX; identical to renormalize for softmax weights).
    topk_norm: str = "none"
    load_balance_coef: float = 1e-3
    z_loss_coef: float = 1e-3
    # 0 = dropless; > 0: each expert takes at most ceil(capacity_factor * tokens * top_k / n_experts)
    # assignments, later tokens first dropped.
    capacity_factor: float = 0.0

    def validate(self) -> list[str]:
        """Human-readable problems (empty when the config is consistent)."""
        errs = []
        if self.n_experts < 1:
            errs.append(f"moe.n_experts={self.n_experts} must be >= 1")
        if not 1 <= self.top_k <= max(self.n_experts, 1):
            errs.append(f"moe.top_k={self.top_k} must be between 1 and moe.n_experts={self.n_experts}; "
                        f"lower top_k or add experts")
        if self.topk_norm not in TOPK_NORMS:
            errs.append(f"moe.topk_norm={self.topk_norm!r} is unknown; choose one of {TOPK_NORMS}")
        if self.expert_hidden < 0:
            errs.append(f"moe.expert_hidden={self.expert_hidden} must be >= 0 (0 = the model's ffn_dim)")
        for name in ("load_balance_coef", "z_loss_coef", "capacity_factor"):
            if getattr(self, name) < 0:
                errs.append(f"moe.{name}={getattr(self, name)} must be >= 0")
        return errs


class RouterOutput(NamedTuple):
    weights: torch.Tensor  # [N, k] combine weights of the chosen experts (router dtype)
    expert_ids: torch.Tensor  # [N, k] int64
    logits: torch.Tensor  # [N, E] router dtype (float32, or float64 for float64 inputs)
    probs: torch.Tensor  # [N, E] full softmax


class BalanceStats(NamedTuple):
    """What the load-balancing loss needs of one or more MoE layers' routing."""
    counts: torch.Tensor  # [E] top-k assignments per expert (no gradient)
    prob_sum: torch.Tensor  # [E] sum over rows of the full softmax (carries the gradient)
    rows: int  # tokens routed (summed over pooled layers)


def balance_stats(probs: torch.Tensor, expert_ids: torch.Tensor, n_experts: int) -> BalanceStats:
    """Stats of one layer: full softmax `probs` [N, E], chosen `expert_ids` [N, k]."""
    counts = torch.bincount(expert_ids.reshape(-1), minlength=n_experts).to(probs.dtype)
    return BalanceStats(counts, probs.sum(0), probs.shape[0])


def load_balancing_loss(stats: BalanceStats) -> torch.Tensor:
    """E * sum_e f_e * P_e with f_e = counts_e / rows, P_e = prob_sum_e / rows (HF's
    `load_balancing_loss_func` on the same rows; k at perfect balance)."""
    return stats.counts.numel() * (stats.counts * stats.prob_sum).sum() / (stats.rows * stats.rows)


def pooled_load_balance(modules) -> torch.Tensor | None:
    """coef * load_balancing_loss over the rows of all `modules` (MoE layers that ran a forward):
    HF pools every MoE layer of the model into one f and one P. A model part holding only some of
    the model's MoE layers (a pipeline stage) pools its own and weighs the term by its share
    (held / `pooled_layers`), so that the stages' terms add up to the whole when the layers route alike."""
    mods = [m for m in modules if m.balance_stats is not None]
    if not mods:
        return None
    counts = sum(m.balance_stats.counts for m in mods)
    prob_sum = sum(m.balance_stats.prob_sum for m in mods)
    rows = sum(m.balance_stats.rows for m in mods)
    share = len(mods) / max(mods[0].pooled_layers, len(mods))
    return mods[0].cfg.load_balance_coef * share * load_balancing_loss(BalanceStats(counts, prob_sum, rows))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE), logits [N, E]."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class TopKRouter(nn.Module):
    """Linear gate -> softmax over all E experts in float32 -> top-k (optionally renormalised)."""

    def __init__(self, dim: int, n_experts: int, top_k: int, topk_norm: str = "none", *,
                 init_std: float = 0.02):
        super().__init__()
        if topk_norm not in TOPK_NORMS:
            raise ValueError(f"topk_norm={topk_norm!r} is unknown; choose one of {TOPK_NORMS}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        self.top_k, self.topk_norm, self.init_std = top_k, topk_norm, init_std
        self.gate = nn.Linear(dim, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x [N, C] -> RouterOutput; math in float32 (float64 if x is float64), autocast off."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.gate.weight.to(dtype))  # [N, E]
        probs = logits.softmax(dim=-1)
        weights, expert_ids = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.topk_norm != "none":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(weights, expert_ids, logits, probs)

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.gate.weight, std=self.init_std)


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights w1, w3 [E, C, H] and w2 [E, H, C].

    Stacked so that expert parallelism shards dim 0 and a grouped GEMM consumes them directly;
    the expert count is read from the weights, so an EP shard runs the same code.
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, *, init_std: float = 0.02):
        super().__init__()
        self.init_std = init_std
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor | list[int]) -> torch.Tensor:
        """x_sorted [M, C] in expert-contiguous segments of `counts` [E] rows -> [M, C]."""
        return expert_forward(x_sorted, counts, self.w1, self.w3, self.w2)

    def init_weights(self, out_std: float | None = None) -> None:
        nn.init.trunc_normal_(self.w1, std=self.init_std)
        nn.init.trunc_normal_(self.w3, std=self.init_std)
        nn.init.trunc_normal_(self.w2, std=out_std or self.init_std)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts replacing a dense MLP: [B, T, C] -> [B, T, C]."""

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, *, init_std: float = 0.02):
        super().__init__()
        errs = cfg.validate()
        if errs:
            raise ValueError("invalid MoEConfig: " + "; ".join(errs))
        self.cfg = cfg
        self.dim = dim
        self.hidden = cfg.expert_hidden or hidden
        if self.hidden < 1:
            raise ValueError(f"MoE expert hidden width is {self.hidden}; pass hidden > 0 or set "
                             f"moe.expert_hidden")
        self.router = TopKRouter(dim, cfg.n_experts, cfg.top_k, cfg.topk_norm, init_std=init_std)
        self.experts = GroupedExperts(cfg.n_experts, dim, self.hidden, init_std=init_std)
        self.aux_losses: dict[str, torch.Tensor] = {}
        # Routing stats of the last forward, pooled over the model's MoE layers by
        # `pooled_load_balance`; `pooled_layers` is how many MoE layers the whole model has (the
        # model sets it; a pipeline stage holds only some of them).
        self.balance_stats: BalanceStats | None = None
        self.pooled_layers = 1
        # Detached tensors from the last forward; `metrics` turns them into floats only when read,
        # so training steps that do not log never synchronise with the device.
        self._stats: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE expects x of shape [B, T, {self.dim}], got {tuple(x.shape)}")
        B, T, C = x.shape
        N, E, k = B * T, self.cfg.n_experts, self.cfg.top_k
        x2 = x.reshape(N, C)
        r = self.router(x2)
        stats = balance_stats(r.probs, r.expert_ids, E)
        lb = load_balancing_loss(stats)
        z = router_z_loss(r.logits)

        order, counts = sort_tokens_by_expert(r.expert_ids, E)
        dropped = counts.new_zeros(())
        if self.cfg.capacity_factor > 0:
            capacity = expert_capacity(N, k, E, self.cfg.capacity_factor)
            order, counts, dropped = apply_capacity(order, counts, capacity)
        x_sorted = permute(x2, order, k)  # [M, C]: x2[order // k], a Triton gather on CUDA
        y_sorted = self.experts(x_sorted, counts)
        y = combine(y_sorted, order, r.weights, N)

        self.balance_stats = stats
        self.aux_losses = {"z_loss": self.cfg.z_loss_coef * z}
        self._stats = {"load_balance": lb.detach(), "z_loss": z.detach(), "dropped_tokens": dropped,
                       "expert_load": stats.counts / (N * k)}
        return y.view(B, T, C)

    @property
    def metrics(self) -> dict[str, float | int | list[float]]:
        """Last forward, for logging: unweighted losses of this layer alone, dropped assignments, load
        fraction per expert."""
        if self._stats is None:
            return {}
        s = self._stats
        return {"load_balance": float(s["load_balance"]), "z_loss": float(s["z_loss"]),
                "dropped_tokens": int(s["dropped_tokens"]), "expert_load": s["expert_load"].tolist()}

    def init_weights(self, out_std: float | None = None) -> None:
        self.router.init_weights()
        self.experts.init_weights(out_std)

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token: 6 * (router C*E + k experts of 3*C*H)."""
        # The router always scores all experts, even when expert parallelism shards the weights.
        E, k = self.cfg.n_experts, self.cfg.top_k
        return 6.0 * (self.dim * E + k * 3 * self.dim * self.hidden)
