"""Fully sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each block of `model.layers` becomes one FSDP unit (its parameters are all-gathered just before
the block runs and freed after), then the root takes what is left (embeddings, final norm, LM
head). This is torchtitan's pattern (`models/llama3/infra/parallelize.py`): one all-gather per
block overlaps with the previous block's compute, and the units follow the one structure every
family shares, so no family needs its own wrap policy.

FSDP2 shards each parameter as a `DTensor` on dim 0 over the data-parallel mesh; parameter names
(FQNs) do not change, so `torch.distributed.checkpoint.state_dict.get_state_dict` /
`set_state_dict` + `dcp.save` / `dcp.load` save and load across a change of layout (dp=2 <-> one
process <-> dp x tp). It composes with tensor parallelism: apply TP on the `tp` dimension first,
then `apply_fsdp(model, mesh["dp"])` (STYLE.md section 3 order: TP/SP/EP -> activation
checkpointing -> compile -> FSDP).

Gradients are averaged over the dp ranks (reduce-scatter, then divided by dp): each rank's loss
must be the mean over its own micro-batch, exactly as with DDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtype(name: str, dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise ValueError(f"apply_fsdp: {name}={dtype} is not a floating dtype; use one of "
                         f"{[str(d) for d in _FLOAT_DTYPES]} or None (keep the parameters' dtype)")


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, cpu_offload: bool = False,
               reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` over the 1-D data-parallel mesh `dp_mesh`: one FSDP unit per block, then the root.

    param_dtype: dtype of the all-gathered parameters used in forward/backward (e.g. torch.bfloat16);
        None computes in the stored dtype. The sharded master weights and the optimizer stay in the
        parameters' own dtype (float32).
    reduce_dtype: dtype of the gradient reduce-scatter; float32 keeps the sum exact-ish under bf16.
    cpu_offload: keep sharded parameters, gradients and optimizer state in host memory (the
        optimizer step then runs on the CPU).
    reshard_after_forward: free the gathered parameters after each block's forward and gather them
        again in backward (ZeRO-3 memory); False keeps them (ZeRO-2-like: more memory, less comm).
        The last block is never resharded: backward needs it at once (torchtitan does the same).

    Returns the same module object, now an `FSDPModule` (its class is swapped in place).
    """
    if not isinstance(dp_mesh, DeviceMesh):
        raise ValueError(f"apply_fsdp: dp_mesh must be a DeviceMesh, got {type(dp_mesh).__name__}; "
                         f"build one with parallel.build_mesh(...) or init_device_mesh(device, (dp,))")
    if dp_mesh.ndim != 1:
        raise ValueError(f"apply_fsdp: dp_mesh has {dp_mesh.ndim} dimensions {dp_mesh.mesh_dim_names}; pass the "
                         f"1-D data-parallel slice, e.g. mesh['dp']")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        raise ValueError(f"apply_fsdp: {type(model).__name__} has no `layers` nn.ModuleDict; every model must keep "
                         f"its blocks in `self.layers` (models/registry.py contract)")
    if isinstance(model, FSDPModule):
        raise ValueError("apply_fsdp: the model is already sharded with FSDP; apply it once, last")
    mp_policy = mixed_precision_policy(model, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # Pinned host memory needs an accelerator; on a CPU-only machine pinning raises.
    pin = torch.accelerator.is_available()
    offload_policy = CPUOffloadPolicy(pin_memory=pin) if cpu_offload else OffloadPolicy()
    blocks = list(layers.values())
    for i, block in enumerate(blocks):
        # Prefetching in backward starts from the last block, which forward has just used.
        reshard = reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, offload_policy=offload_policy,
                    reshard_after_forward=reshard, shard_placement_fn=_shard_placement)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, offload_policy=offload_policy,
                reshard_after_forward=reshard_after_forward, shard_placement_fn=_shard_placement)
    return model


def mixed_precision_policy(model: nn.Module, *, param_dtype: torch.dtype | None = None,
                           reduce_dtype: torch.dtype | None = torch.float32) -> MixedPrecisionPolicy:
    """`apply_fsdp`'s policy (also for FSDP units made elsewhere, e.g. expert-parallel experts):
    a reduce dtype narrower than the parameters is dropped unless `param_dtype` (mixed precision)
    is set, so float64 runs are never reduced in float32."""
    _check_dtype("param_dtype", param_dtype)
    _check_dtype("reduce_dtype", reduce_dtype)
    widest = max((p.dtype.itemsize for p in model.parameters() if p.is_floating_point()), default=4)
    if param_dtype is None and reduce_dtype is not None and reduce_dtype.itemsize < widest:
        reduce_dtype = None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def _shard_placement(param: nn.Parameter) -> Shard | None:
    """FSDP's shard dim: dim 0 (None), except for a tensor-parallel `_StridedShard` on dim 0.

    Mamba's in_proj rows are [x | z] and tensor parallelism gives each rank a block of both halves
    (`_StridedShard(0, split_factor=2)`). FSDP's own dim-0 sharding of such a parameter would nest
    a second strided split in the same dim, which DTensor does not redistribute correctly (the
    gradient came back permuted); sharding those on dim 1 keeps the two splits independent.
    """
    if isinstance(param, DTensor) and param.ndim > 1 and any(
            isinstance(p, _StridedShard) and p.dim == 0 for p in param.placements):
        return Shard(1)
    return None


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """FSDP2's counterpart of DDP's `no_sync()`: backward inside accumulates local, unsharded gradients.

    For every micro-batch of an accumulation window but the last. It saves a reduce-scatter per
    micro-batch at the price of holding full-size gradients until the last one; reducing every
    micro-batch (not using this) is the memory-lean choice torchtitan makes.
    """
    if not isinstance(model, FSDPModule):
        raise ValueError(f"no_gradient_sync: {type(model).__name__} is not sharded with apply_fsdp; "
                         f"for DDP use model.no_sync()")
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
