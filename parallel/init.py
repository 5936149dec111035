"""Sharded start: initial weights that depend on the seed and the parameter's name, never the layout.

A model is built on the meta device (no memory), the layout applied (TP, EP, FSDP2, pipeline
stages: all of them work on meta), the parameters allocated with `to_empty` (keeping their
gradient hooks: `to_empty_keeping_hooks`), and then
`init_model_weights` fills each rank's shards. The values equal the single-process start for the
same seed whatever the layout, because each *unit* draws from its own generator seeded by the
run's seed and the unit's fully qualified name (`unit_seed`):

- `tok_embeddings.weight` (normal) and `output.weight` (truncated normal), the largest tensors,
  are drawn in blocks of `ROW_BLOCK` rows, block b seeded by "<name>#b": a rank whose shard is a
  range of rows (FSDP2's and TP's Shard(0)) draws only the blocks its rows touch;
- every other unit (each block `layers.<i>`, the final `norm`) is one module: a CPU copy of it
  is materialised from the meta template, its own `init_weights()` runs under its seed, and each
  rank keeps its local part of every tensor (`distribute_tensor(..., src_data_rank=None)`: a
  local slice, no communication, any placement including FSDP-over-TP's strided shards). Peak
  memory at start is this rank's shards plus one block, not the model.
- the rotary table (`freqs`) is recomputed from the config.

`build_plain_model` (trainer/step.py) starts the single-process model the same way, so every layout
test comparing against one process compares against these values.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from titanforge.models.common.layers import rope_frequencies
from titanforge.models.registry import build_model

# Rows per independently seeded block of an embedding / LM head.
ROW_BLOCK = 256
# Wrappers whose attribute names appear in a parallelised model's FQNs and not in the plain model's.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def unit_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run's seed and a unit's name (stable across runs, processes, versions)."""
    digest = hashlib.sha256(f"titanforge-init:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def plain_name(fqn: str) -> str:
    """The plain model's name for a parameter of a wrapped (checkpointed, compiled, DDP) model."""
    for part in _WRAPPER_PARTS:
        fqn = fqn.replace(part, "")
    return fqn[len("module."):] if fqn.startswith("module.") else fqn


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` by its plain name (tied parameters once)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        out.setdefault(plain_name(name), t)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def fill_from_full(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full tensor `full` (CPU, identical on every rank) into `target`."""
    if tuple(full.shape) != tuple(target.shape):
        raise ValueError(f"initial value of shape {tuple(full.shape)} for a parameter of shape {tuple(target.shape)}")
    if isinstance(target, DTensor):
        full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
    _local(target).copy_(full)


def _row_range(target: torch.Tensor) -> tuple[int, int] | None:
    """Global rows [start, stop) of this rank's part when it is a range of whole rows, else None."""
    if not isinstance(target, DTensor):
        return 0, target.shape[0]
    if any(type(p) not in (Shard, Replicate) or (type(p) is Shard and p.dim != 0) for p in target.placements):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    return offset[0], offset[0] + shape[0]


def _draw_rows(name: str, seed: int, start: int, stop: int, n_cols: int, dist: str, std: float,
               dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of a [rows, n_cols] tensor drawn block by block (CPU)."""
    out = torch.empty(stop - start, n_cols, dtype=dtype)
    b = start // ROW_BLOCK
    while b * ROW_BLOCK < stop:
        lo, hi = b * ROW_BLOCK, (b + 1) * ROW_BLOCK
        g = torch.Generator().manual_seed(unit_seed(seed, f"{name}#{b}"))
        block = torch.empty(ROW_BLOCK, n_cols, dtype=dtype)
        if dist == "normal":
            nn.init.normal_(block, std=std, generator=g)
        else:
            nn.init.trunc_normal_(block, std=std, generator=g)
        a, z = max(lo, start), min(hi, stop)
        out[a - start:z - start] = block[a - lo:z - lo]
        b += 1
    return out


@torch.no_grad()
def _fill_rows(target: torch.Tensor, name: str, seed: int, dist: str, std: float) -> None:
    rows = _row_range(target)
    n, c = target.shape
    if rows is None:
        fill_from_full(target, _draw_rows(name, seed, 0, n, c, dist, std, target.dtype))
        return
    _local(target).copy_(_draw_rows(name, seed, rows[0], rows[1], c, dist, std, target.dtype))


def init_units(template: nn.Module) -> list[str]:
    """Module units initialised as a whole, in order: each block of `layers`, then the final norm."""
    return [f"layers.{i}" for i in template.layers.keys()] + ["norm"]


@torch.no_grad()
def init_model_weights(model: nn.Module, model_cfg, seed: int, exempt: frozenset[str] = frozenset()) -> None:
    """Fill every parameter and buffer of `model` (a CausalLM, a pipeline stage of one, or either
    parallelised, all materialised with `to_empty`) with its seed- and name-determined value.

    Raises if a tensor of `model` is not covered, so a new family or buffer cannot start silently
    uninitialised; `exempt` names tensors the caller fills itself (SVF's factors, trainer/svf.py)."""
    targets = model_tensors(model)
    done: set[str] = set()
    std = model_cfg.init_std
    if "tok_embeddings.weight" in targets:
        _fill_rows(targets["tok_embeddings.weight"], "tok_embeddings.weight", seed, "normal", std)
        done.add("tok_embeddings.weight")
    if "output.weight" in targets:
        _fill_rows(targets["output.weight"], "output.weight", seed, "trunc_normal", std)
        done.add("output.weight")
    if "freqs" in targets:
        fill_from_full(targets["freqs"], rope_frequencies(model_cfg.head_dim, model_cfg.max_seq_len,
                                                           model_cfg.rope_theta))
        done.add("freqs")
    template = build_model(model_cfg, device="meta")
    for unit in init_units(template):
        prefix = unit + "."
        if not any(name.startswith(prefix) for name in targets):
            continue  # a pipeline stage without this block
        module = template.get_submodule(unit)
        module.to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(unit_seed(seed, unit))
            module.init_weights()
        for local_name, full in list(module.named_parameters()) + list(module.named_buffers()):
            name = prefix + local_name
            if name in targets:
                fill_from_full(targets[name], full)
                done.add(name)
        module.to_empty(device="meta")  # drop the unit's memory before the next one
    missing = sorted(set(targets) - done - exempt)
    if missing:
        raise RuntimeError(f"init_model_weights: no initial value for {missing[:5]}; every tensor must belong to "
                           f"tok_embeddings, output, freqs or a unit of parallel/init.py:init_units")


def seed_source(model_cfg, seed: int):
    """name -> the full tensor `init_model_weights` gives that parameter (CPU), one tensor at a
    time: the unit it belongs to is materialised once and kept until a name of another unit is
    asked for (ask in module order). For code that needs whole matrices of a seed-initialised
    model without holding the model (SVF's decomposition, trainer/svf.py)."""
    template = build_model(model_cfg, device="meta")
    units = init_units(template)
    held: dict = {"unit": None, "tensors": {}}

    def source(name: str) -> torch.Tensor | None:
        if name in ("tok_embeddings.weight", "output.weight"):
            p = template.get_parameter(name)
            dist = "normal" if name.startswith("tok_") else "trunc_normal"
            return _draw_rows(name, seed, 0, p.shape[0], p.shape[1], dist, model_cfg.init_std, p.dtype)
        unit = next((u for u in units if name.startswith(u + ".")), None)
        if unit is None:
            return None
        if held["unit"] != unit:
            module = build_model(model_cfg, device="meta").get_submodule(unit).to_empty(device="cpu")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(unit_seed(seed, unit))
                module.init_weights()
            held["unit"], held["tensors"] = unit, dict(list(module.named_parameters()) + list(module.named_buffers()))
        t = held["tensors"].get(name[len(unit) + 1:])
        return None if t is None else t.detach()

    return source
def to_empty_keeping_hooks(model: nn.Module, device: torch.device) -> nn.Module:
    """`model.to_empty(device=device)`, keeping the parameters' gradient hooks (`register_hook`).

    `Module.to_empty` replaces a DTensor parameter's storage with `torch.utils.swap_tensors`: the
    Python object keeps its `_backward_hooks` dict, but the autograd hook that calls it stays on
    the old tensor, so hooks registered before (`finalize_grads`' redistribution of tensor-parallel
    gradients, parallel/tp_styles.py) and hooks registered after are silently never called (torch
    2.13). Without them a vocab-parallel embedding's gradient stayed Replicate [V, C] while its
    pipeline twin's was Shard(0) [V/tp, C], and the tied-embedding all-reduce aborted in gloo
    ("6144 vs 3072"). The dicts are detached and their hooks registered again on the new tensors."""
    hooks = [(p, list(p._backward_hooks.values())) for p in model.parameters() if p._backward_hooks is not None]
    model.to_empty(device=device)
    for p, fns in hooks:
        p._backward_hooks = None
        for fn in fns:
            p.register_hook(fn)
    return model


def materialize(model: nn.Module, model_cfg, seed: int, device: torch.device) -> nn.Module:
    """Allocate a meta-built (possibly parallelised) model's local shards on `device` and initialise them."""
    to_empty_keeping_hooks(model, device)
    init_model_weights(model, model_cfg, seed)
    return model
