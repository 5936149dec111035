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
        unsupported = [f"{k}={v}" for k, v in (("pp", dims.pp), ("cp", dims.cp), ("ep", dims.ep)) if v != 1]
        if unsupported:
            # Pipeline, context and expert parallelism are not wired into the trainer yet (issue 6).
            raise LayoutError(f"parallel {', '.join(unsupported)} is not available in this release; "
                              f"use data and tensor parallelism (parallel.dp, parallel.tp)")
        if cfg.dp_backend not in ("ddp", "fsdp"):
            raise LayoutError(f"parallel.dp_backend={cfg.dp_backend!r} is not available in the trainer yet; use ddp "
                              f"or fsdp (ZeRO via DeepSpeed exists as a library: titanforge.parallel.zero)")
        if dims.tp > 1 and dims.dp > 1 and cfg.dp_backend != "fsdp":
            raise LayoutError(f"tp={dims.tp} with dp={dims.dp} needs parallel.dp_backend=fsdp (DDP does not "
                              f"compose with tensor-parallel DTensor parameters)")
        return dims


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    """A ("dp", "tp") mesh over all ranks (tp innermost: a TP group shares a node), or None in a
    single process without a process group."""
    if not torch.distributed.is_initialized():
        return None
    return init_device_mesh(device_type, (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))
