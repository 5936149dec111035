"""LoRA (Hu et al. 2021, arXiv 2106.09685), the baseline SVF is measured against.

W' = W + (alpha / r) B A with A [r, in] (Kaiming-uniform) and B [out, r] (zeros), so the adapted
model starts as the base model; only A and B train. Selected with the same fnmatch patterns as
SVF (`models/svf.py`), so the two adapt the same matrices.
"""

from __future__ import annotations

import fnmatch
import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from titanforge.models.svf import DEFAULT_TARGETS


class LoRALinear(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features, self.rank = linear.in_features, linear.out_features, rank
        self.scale = alpha / rank
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = (nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
                     if linear.bias is not None else None)
        kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS,
               exclude=()) -> List[str]:
    """Wrap the selected nn.Linear modules in LoRALinear and freeze everything else."""
    if rank < 1:
        raise ValueError(f"LoRA rank={rank} must be >= 1")
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear
             and any(fnmatch.fnmatchcase(n, p) for p in targets) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if not names:
        raise ValueError(f"LoRA targets {list(targets)} match no nn.Linear of the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, float(alpha if alpha is not None else 2 * rank)))
    return names
