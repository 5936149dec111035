"""The parallel layout: degrees from the config checked against the world, and the device mesh.

Like torchtitan's ParallelDims: the degrees are data; `build_mesh` turns them into a
`DeviceMesh` with named dimensions. Layouts this release cannot run yet are rejected here, before
any model is built, with a message that says what would fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titanforge.parallel.config import ParallelConfig


class LayoutError(ValueError):
    """An impossible parallel layout; the message says what would fit."""


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    pp: int
    cp: int
    ep: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        model_par = cfg.tp * cfg.pp * cfg.cp
        if min(cfg.tp, cfg.pp, cfg.cp, cfg.ep) < 1:
            raise LayoutError(f"parallel degrees must be >= 1, got tp={cfg.tp} pp={cfg.pp} cp={cfg.cp} ep={cfg.ep}")
        if world_size % model_par:
            raise LayoutError(f"world size {world_size} is not divisible by tp*pp*cp = {model_par}; "
                              f"launch a multiple of {model_par} processes or lower the degrees")
        dp = cfg.dp if cfg.dp != -1 else world_size // model_par
        if dp * model_par != world_size:
            raise LayoutError(f"dp*tp*pp*cp = {dp}*{cfg.tp}*{cfg.pp}*{cfg.cp} = {dp * model_par} != world size "
                              f"{world_size}; set parallel.dp={world_size // model_par} or parallel.dp=-1")
        dims = cls(dp=dp, tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, ep=cfg.ep, world_size=world_size)
        if dp % cfg.ep:
            # Expert parallelism borrows its ranks from data parallelism (see ParallelMesh).
            fits = [e for e in range(1, dp + 1) if dp % e == 0]
            raise LayoutError(f"parallel.ep={cfg.ep} must divide the data-parallel degree dp={dp} (expert "
                              f"parallelism uses data-parallel ranks); choose ep in {fits} or raise dp")
        if cfg.dp_backend == "deepspeed":
            # The DeepSpeed step drives one engine over the whole model: pure data parallelism only.
            others = [f"{k}={v}" for k, v in (("tp", dims.tp), ("pp", dims.pp), ("cp", dims.cp), ("ep", dims.ep))
                      if v != 1]
            if others:
                raise LayoutError(f"parallel.dp_backend=deepspeed runs pure data parallelism (ZeRO over all "
                                  f"{world_size} ranks); {', '.join(others)} does not compose with it here. Use "
                                  f"parallel.dp_backend=fsdp (ZeRO-3-style sharding that composes with "
                                  f"tp/pp/ep), or set {', '.join(o.split('=')[0] + '=1' for o in others)}")
            if cfg.zero_stage not in (1, 2, 3):
                raise LayoutError(f"parallel.zero_stage={cfg.zero_stage} must be 1, 2 or 3 with "
                                  f"parallel.dp_backend=deepspeed (plain data parallelism: parallel.dp_backend=ddp)")
            return dims
        if dims.ep > 1:
            # Combinations of expert parallelism that are not implemented or not checked (docs/design.md).
            others = [f"parallel.{k}={v}" for k, v in (("tp", dims.tp), ("pp", dims.pp), ("cp", dims.cp)) if v != 1]
            if others:
                raise LayoutError(f"parallel.ep={dims.ep} with {', '.join(others)} is not available: expert "
                                  f"parallelism runs with data parallelism only (ep x tp/pp/cp is not implemented); "
                                  f"set {', '.join(o.split('=')[0] + '=1' for o in others)} or parallel.ep=1")
        if dims.pp > 1:
            from titanforge.parallel.pipeline import check_pipeline_config

            errs = check_pipeline_config(cfg)
            if errs:
                raise LayoutError(errs[0])
        if dims.cp > 1 and dims.pp > 1:
            raise LayoutError(f"parallel.cp={dims.cp} with parallel.pp={dims.pp} is not available (context "
                              f"parallelism runs with data and tensor parallelism); set parallel.pp=1 or parallel.cp=1")
        if cfg.dp_backend not in ("ddp", "fsdp"):
            raise LayoutError(f"parallel.dp_backend={cfg.dp_backend!r} must be ddp | fsdp | deepspeed")
        if dims.tp > 1 and dims.dp * dims.cp > 1 and cfg.dp_backend != "fsdp":
            # Context-parallel ranks are model replicas for the gradient reduction, like dp ranks.
            ranks = f"dp={dims.dp}" + (f" x cp={dims.cp}" if dims.cp > 1 else "")
            raise LayoutError(f"tp={dims.tp} with {ranks} needs parallel.dp_backend=fsdp (DDP does not compose "
                              f"with tensor-parallel DTensor parameters)")
        return dims


def check_model_layout(model, dims: ParallelDims, cfg: ParallelConfig) -> list[str]:
    """Problems of this layout for this model (a `ModelConfig`): more pipeline stages than layers,
    experts that do not split over the ep ranks. Empty when it fits; messages say what would."""
    errs = []
    stages = dims.pp * cfg.pp_virtual_stages
    if dims.pp > 1 and stages > model.n_layers:
        errs.append(f"parallel.pp={dims.pp} x parallel.pp_virtual_stages={cfg.pp_virtual_stages} = {stages} "
                    f"pipeline stages but the model has {model.n_layers} layers; use at most {model.n_layers} "
                    f"stages in all")
    if dims.ep > 1:
        moe = getattr(getattr(model, model.family, None), "moe", None)
        if moe is None:
            errs.append(f"parallel.ep={dims.ep} but model.family={model.family!r} has no mixture-of-experts "
                        f"layers; set parallel.ep=1")
        elif moe.n_experts % dims.ep:
            fits = [e for e in range(1, moe.n_experts + 1) if moe.n_experts % e == 0 and dims.dp % e == 0]
            errs.append(f"parallel.ep={dims.ep} does not divide the {moe.n_experts} experts "
                        f"(model.{model.family}.moe.n_experts); choose ep in {fits}")
        elif not _has_moe_layer(model):
            pattern = getattr(model, model.family).layer_pattern
            errs.append(f"parallel.ep={dims.ep} but model.{model.family}.layer_pattern={pattern!r} has no "
                        f"mixture-of-experts layer (feed-forward letter E); set parallel.ep=1 or add E layers")
    return errs


def _has_moe_layer(model) -> bool:
    """Whether the family's layer pattern (if it has one) places at least one MoE feed-forward."""
    from titanforge.models.common.pattern import parse_layer_pattern

    pattern = getattr(getattr(model, model.family), "layer_pattern", None)
    return pattern is None or any(s.ffn == "moe" for s in parse_layer_pattern(pattern, model.n_layers))


class ParallelMesh:
    """The device meshes of one layout, by name: "pp", "dp_rep", "ep", "cp", "tp", "dp" and "dp_cp".

    `root` has dimensions, outermost first, ("pp", "dp_rep", "ep", "cp", "tp"): tp innermost, so a TP
    group shares a node; pp outermost, so stages exchange only activations. The data-parallel
    mesh "dp" is "dp_rep" x "ep" flattened: expert parallelism borrows its ranks from data
    parallelism, so experts are sharded over "ep" and replicated over "dp_rep", while every other
    weight is replicated (or FSDP-sharded) over all of "dp". With ep=1, "dp" holds the same ranks
    as "dp_rep". Kept as a name -> mesh table (torchtitan's bookkeeping) because slicing a
    flattened dimension out of the root mesh is deprecated.
    """

    def __init__(self, root: DeviceMesh):
        self.root = root
        self._meshes = {name: root[name] for name in root.mesh_dim_names}
        self._meshes["dp"] = root["dp_rep", "ep"]._flatten("dp")
        # The ranks holding replicas of the same weights: data- and context-parallel ranks
        # together (a context-parallel rank's gradient covers only its part of the sequence).
        self._meshes["dp_cp"] = root["dp_rep", "ep", "cp"]._flatten("dp_cp")

    def __getitem__(self, name: str) -> DeviceMesh:
        if name not in self._meshes:
            raise KeyError(f"no mesh dimension {name!r}; the layout has {sorted(self._meshes)}")
        return self._meshes[name]


def build_mesh(dims: ParallelDims, device_type: str) -> ParallelMesh | None:
    """The layout's meshes over all ranks, or None in a single process without a process group."""
    if not torch.distributed.is_initialized():
        return None
    root = init_device_mesh(device_type, (dims.pp, dims.dp // dims.ep, dims.ep, dims.cp, dims.tp),
                            mesh_dim_names=("pp", "dp_rep", "ep", "cp", "tp"))
    return ParallelMesh(root)
