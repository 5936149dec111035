"""Singular Value Fine-tuning (SVF), the adaptation of Transformer² (Sun, Cetin, Tang 2025,
arXiv 2501.06252), as a transform of any of our models.

Every selected weight matrix is decomposed once, W = U diag(s) V^T (full rank r = min(out, in)),
and a task "expert" is one vector z in R^r per matrix: the adapted matrix is

    W' = U diag(s * z) V^T,            z = 1 reproduces W.

Only z trains; U, s, V^T and every other parameter are frozen. Experts compose by mixing their z
(z' = sum_k alpha_k z_k, the paper's few-shot adaptation).

Symbols: out/in the matrix shape, r = min(out, in), U [out, r], s [r], V^T [r, in], z [r].

Where this differs from the paper: the paper decomposes the attention and MLP matrices of a
pretrained Llama/Mistral; we decompose every `nn.Linear` whose qualified name matches the
configured patterns (by default all of them inside the blocks: attention, MLP, mixer projections),
in any of our families. MoE expert banks (stacked [E, out, in] tensors, not `nn.Linear`) and the
embedding and output head are not decomposed.

U and V^T are frozen `nn.Parameter`s (requires_grad False), not buffers, so FSDP2 shards them
like the weight they replace and tensor parallelism splits them the way it splits that weight
(`parallel/tensor_parallel.py`: U by rows for a column-parallel matrix, V^T by columns for a
row-parallel one; s and z are replicated).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

# The blocks' matrices; the embedding and output head stay as they are.
DEFAULT_TARGETS = ("layers.*",)


@dataclass
class SVFConfig:
    # fnmatch patterns over the qualified names of nn.Linear modules to decompose.
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # Names matching any of these are left alone even if a target matches.
    exclude: List[str] = field(default_factory=list)


def svd_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [out, r], s [r], V^T [r, in] of `weight` (computed in float64, returned in its dtype)."""
    U, s, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    # LAPACK hands back column-major factors: make them row-major (collectives and safetensors
    # move the storage as it lies).
    return (U.to(weight.dtype).contiguous(), s.to(weight.dtype).contiguous(), Vh.to(weight.dtype).contiguous())


class SVFLinear(nn.Module):
    """y = x W'^T + b with W' = U diag(s * z) V^T; only z is trainable.

    `weight` is the adapted matrix (a property), so code that reads a linear layer's weight or its
    shape keeps working.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        r = min(in_features, out_features)
        kw = dict(device=device, dtype=dtype)
        self.U = nn.Parameter(torch.empty(out_features, r, **kw), requires_grad=False)
        self.s = nn.Parameter(torch.empty(r, **kw), requires_grad=False)
        self.Vh = nn.Parameter(torch.empty(r, in_features, **kw), requires_grad=False)
        self.z = nn.Parameter(torch.ones(r, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, factors=None) -> "SVFLinear":
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype)
        if w.is_meta:
            # Sharded start: the factors are filled per rank after the layout (trainer/svf.py).
            return m
        U, s, Vh = factors if factors is not None else svd_factors(w)
        with torch.no_grad():
            m.U.copy_(U)
            m.s.copy_(s)
            m.Vh.copy_(Vh)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    @property
    def weight(self) -> torch.Tensor:
        # [out, r] * [r] -> [out, r] @ [r, in]
        return (self.U * (self.s * self.z)) @ self.Vh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def init_weights(self) -> None:
        """z = 1 (the base model); the factors come from `from_linear` or a checkpoint."""
        with torch.no_grad():
            self.z.fill_(1.0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.z.numel()}"


def _selected(name: str, cfg: SVFConfig) -> bool:
    return (any(fnmatch.fnmatchcase(name, p) for p in cfg.targets)
            and not any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude))


def svf_targets(model: nn.Module, cfg: SVFConfig) -> List[str]:
    """Qualified names of the nn.Linear modules `cfg` selects, in module order."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and _selected(n, cfg)]


def apply_svf(model: nn.Module, cfg: SVFConfig | None = None,
              factors: Dict[str, tuple] | None = None) -> List[str]:
    """Replace the selected nn.Linear modules of `model` by SVFLinear (in place) and freeze every
    parameter but the z-vectors. `factors` maps a module name to precomputed (U, s, V^T) (e.g. a
    cache); the rest are decomposed here, except on a meta-built model, whose SVFLinears are left
    empty for a sharded start to fill. Returns the names replaced."""
    cfg = cfg or SVFConfig()
    names = svf_targets(model, cfg)
    if not names:
        raise ValueError(f"finetune.svf.targets={cfg.targets} match no nn.Linear of the model; "
                         f"names look like {[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        lin = getattr(owner, leaf)
        setattr(owner, leaf, SVFLinear.from_linear(lin, (factors or {}).get(name)))
    return names


def svf_modules(model: nn.Module) -> Dict[str, SVFLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVFLinear)}


def z_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{module name: z} of every SVF matrix (full tensors; DTensors are gathered)."""
    out = {}
    for n, m in svf_modules(model).items():
        z = m.z.detach()
        if hasattr(z, "full_tensor"):
            z = z.full_tensor()
        out[n] = z.clone().cpu()
    return out


def load_z(model: nn.Module, zs: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Set each SVF matrix's z from `zs` (as written by `z_state_dict`)."""
    mods = svf_modules(model)
    if strict:
        missing, extra = sorted(set(mods) - set(zs)), sorted(set(zs) - set(mods))
        if missing or extra:
            raise ValueError(f"z-vectors do not match the model's SVF matrices: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}; were they trained with the same finetune.svf.targets?")
    with torch.no_grad():
        for n, z in zs.items():
            if n not in mods:
                continue
            dst = mods[n].z
            if dst.shape != z.shape:
                raise ValueError(f"z-vector {n} has shape {tuple(z.shape)}, the model's is {tuple(dst.shape)}")
            # Load into the plain model, before parallel/ turns z into a DTensor.
            dst.copy_(z.to(dst.dtype))


def mix_z(experts: List[Dict[str, torch.Tensor]], alphas) -> Dict[str, torch.Tensor]:
    """z' = sum_k alpha_k z_k over the experts' common matrices (the few-shot adaptation)."""
    if len(experts) != len(alphas):
        raise ValueError(f"{len(experts)} experts but {len(alphas)} mixing weights")
    keys = experts[0].keys()
    return {k: sum(float(a) * e[k].to(torch.float64) for a, e in zip(alphas, experts)).to(experts[0][k].dtype)
            for k in keys}
