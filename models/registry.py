"""The one seam between the trainer and the models (like torchtitan's TrainSpec).

Every family's `build(cfg: ModelConfig) -> nn.Module` returns a model that honours this contract:

- `forward(tokens)`: LongTensor [B, T] -> logits [B, T, vocab_size].
- `layers`: an `nn.ModuleDict` keyed `str(i)`, so a pipeline stage can drop layers and keep names.
- `init_weights()`: (re)initialises every parameter in place; with `build_model(cfg, device="meta")`
  followed by `to_empty(device=...)` and `init_weights()` nothing is allocated twice.
- `flops_per_token(seq_len) -> float`: training FLOPs (forward + backward) per token, for MFU.
- Modules that produce auxiliary losses (MoE) store them, already weighted, in the attribute
  `aux_losses: dict[str, Tensor]` during forward; `collect_aux_losses` gathers them for the trainer,
  with the MoE load-balancing loss pooled over all MoE layers as Hugging Face does (one term).
  Modules may also expose `metrics: dict[str, float]` (e.g. expert load), gathered the same way.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from titanforge.kernels.dispatch import set_overrides
from titanforge.models.config import ModelConfig

# family -> "module:function"; imported lazily so one family's heavy imports never slow another.
BUILDERS = {
    "llama": "titanforge.models.llama.model:build",
    "titans": "titanforge.models.titans.model:build",
    "ttt": "titanforge.models.ttt.model:build",
    "jamba": "titanforge.models.jamba.model:build",
}


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model of `cfg.family` on `device`; on "meta", no memory is allocated."""
    if cfg.family not in BUILDERS:
        raise ValueError(f"model.family={cfg.family!r} is unknown; choose one of {sorted(BUILDERS)}")
    # The config's per-op kernel overrides (model.kernels) hold for the process from here on.
    set_overrides(getattr(cfg, "kernels", None))
    module, fn = BUILDERS[cfg.family].split(":")
    build = getattr(importlib.import_module(module), fn)
    with torch.device(device):
        model = build(cfg)
    if str(device) != "meta":
        model.init_weights()
    return model


def collect_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Auxiliary losses of the last forward: those stored by submodules, keyed by module name, and
    the MoE load-balancing loss pooled over every MoE layer in `model` ("load_balance")."""
    from titanforge.models.common.moe import MoE, pooled_load_balance

    out = {}
    for name, mod in model.named_modules():
        for key, val in (getattr(mod, "aux_losses", None) or {}).items():
            out[f"{name}.{key}" if name else key] = val
    balance = pooled_load_balance(m for m in model.modules() if isinstance(m, MoE))
    if balance is not None:
        out["load_balance"] = balance
    return out


def collect_metrics(model: nn.Module) -> dict[str, float]:
    """Per-module metrics (e.g. expert load) from the last forward, keyed by module name."""
    out = {}
    for name, mod in model.named_modules():
        for key, val in (getattr(mod, "metrics", None) or {}).items():
            out[f"{name}.{key}" if name else key] = val
    return out
