"""`titanforge plan`: what a config's model needs, counted on the meta device (no memory)."""

from __future__ import annotations

from torch import nn

from titanforge.models.registry import build_model


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (`...feed_forward.experts.w1`): each token uses top_k of n_experts."""
    return ".experts." in name


def param_counts(model_cfg, model: nn.Module | None = None) -> tuple[int, int]:
    """(total, active per token) parameters; tied weights counted once. Built on meta unless given."""
    model = model if model is not None else build_model(model_cfg, device="meta")
    total = expert = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if is_expert_param(name):
            expert += p.numel()
    active = total
    if expert:
        moe = model_cfg.jamba.moe
        active = total - expert + expert * moe.top_k // moe.n_experts
    return total, active
