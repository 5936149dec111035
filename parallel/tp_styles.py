"""Tensor-parallel building blocks beyond PyTorch's Colwise/Rowwise/SequenceParallel styles.

PyTorch's styles cover modules whose math runs through `nn.Linear` / `nn.Embedding`. The
recurrent mixers (Titans memory, TTT, Mamba) also hold per-head or per-channel tensors that their
own code uses directly (conv weights, memory weights, A_log, ...), on plain local activations.
`LocalRegion` makes such a module work on its shard without changing its code:

- its parameters become DTensors on the tp mesh (so optimizers, FSDP2 and DCP see one global
  tensor per parameter), and during the module's forward each is swapped for its local shard
  (`DTensor.to_local`), so the module's math runs on this rank's heads/channels only;
- optionally its first input is converted from a DTensor (or a local tensor of a stated layout) to
  a local tensor of the layout the region computes on, and its first output back to a DTensor.

The gradient layout of each local view is stated explicitly: a tensor used by every rank on
different heads (e.g. a norm gain shared across heads, or the replicated input of a head-parallel
region) gets a Partial gradient, which is summed over ranks (Megatron's "f" operator); a tensor
used in replicated-identical compute keeps a Replicate gradient.

`finalize_grads` makes every DTensor parameter's gradient carry the parameter's own placement
(a Replicate parameter used on sharded activations otherwise ends with a Partial gradient).
"""

from __future__ import annotations

from functools import partial
from typing import Union

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel
from torch.distributed.tensor.parallel.style import distribute_module

from titanforge.models.svf import SVFLinear

# A parameter's placement, or (placement, placement of its gradient on the local view).
ParamSpec = Union[Placement, tuple]


def _resolve(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_name, _, leaf = name.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), leaf


def distribute_param(owner: nn.Module, leaf: str, mesh: DeviceMesh, placement: Placement) -> None:
    """Replace owner.<leaf> by a DTensor parameter (rank 0's values, scattered) of `placement`."""
    p = owner._parameters[leaf]
    if isinstance(p, DTensor):
        return
    d = distribute_tensor(p.data, mesh, [placement])
    owner.register_parameter(leaf, nn.Parameter(d, requires_grad=p.requires_grad))


class LocalRegion(ParallelStyle):
    """Run a module on local shards of its parameters (see the module docstring).

    params: {dotted name relative to the module: Placement or (Placement, grad Placement)}.
    input_layout: layout of the first positional input when it is a plain tensor; None leaves the
        inputs alone (a DTensor input is taken as it is placed).
    compute_layout / input_grad: the layout the region needs its input in, and the gradient
        layout of that local input (Partial for head-parallel compute, Replicate for identical).
    output_layout: layout of the region's local first output (Partial for a row-parallel
        projection, Shard(d) for channel shards, Replicate for identical compute); None leaves it.
    desired_output_layout / use_local_output / output_grad: where to redistribute the output,
        whether to hand on the local tensor instead of the DTensor, and that local tensor's
        gradient layout (Partial makes Megatron's "f": identity forward, all-reduce backward).
    """

    def __init__(self, params: dict[str, ParamSpec] | None = None, *, input_layout: Placement | None = None,
                 compute_layout: Placement = Replicate(), input_grad: Placement = Partial(),
                 output_layout: Placement | None = None, desired_output_layout: Placement | None = None,
                 use_local_output: bool = False, output_grad: Placement | None = None):
        super().__init__()
        self.params = {k: (v if isinstance(v, tuple) else (v, v)) for k, v in (params or {}).items()}
        self.input_layout, self.compute_layout, self.input_grad = input_layout, compute_layout, input_grad
        self.output_layout, self.desired_output_layout = output_layout, desired_output_layout
        self.use_local_output, self.output_grad = use_local_output, output_grad

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.params = expand_svf_specs(module, self.params)
        for name, (placement, _) in self.params.items():
            distribute_param(*_resolve(module, name), device_mesh, placement)
        saved: list[tuple[nn.Module, str, nn.Parameter]] = []

        def pre_hook(mod, args):
            for name, (_, grad) in self.params.items():
                owner, leaf = _resolve(mod, name)
                p = owner._parameters[leaf]
                saved.append((owner, leaf, p))
                # A plain tensor in _parameters for the duration of forward; restored below.
                owner._parameters[leaf] = p.to_local(grad_placements=[grad])
            if self.input_layout is not None and args and isinstance(args[0], torch.Tensor):
                x = args[0]
                if not isinstance(x, DTensor):
                    x = DTensor.from_local(x, device_mesh, [self.input_layout], run_check=False)
                x = x.redistribute(placements=[self.compute_layout]).to_local(grad_placements=[self.input_grad])
                args = (x, *args[1:])
            return args

        def post_hook(mod, args, output):
            while saved:
                owner, leaf, p = saved.pop()
                owner._parameters[leaf] = p
            if self.output_layout is None or output is None:
                return output
            first = output[0] if isinstance(output, tuple) else output
            y = DTensor.from_local(first, device_mesh, [self.output_layout], run_check=False)
            if self.desired_output_layout is not None:
                y = y.redistribute(placements=[self.desired_output_layout])
            if self.use_local_output:
                y = y.to_local(grad_placements=None if self.output_grad is None else [self.output_grad])
            return (y, *output[1:]) if isinstance(output, tuple) else y

        module.register_forward_pre_hook(pre_hook)
        module.register_forward_hook(post_hook, always_call=True)
        return module


def _svf_placements(placement: Placement, grad: Placement) -> dict[str, tuple]:
    """How the factors of W = U diag(s * z) V^T are placed when W would have `placement`: W's rows
    are U's rows, its columns V^T's columns; s and z are replicated. A rank that computes with its
    rows (or columns) only gets a partial gradient of z, summed over the ranks."""
    rep = (Replicate(), Replicate())
    # Shard or _StridedShard (not a Shard subclass): both split along `dim`.
    dim = getattr(placement, "dim", None)
    if dim in (0, -2):
        return {"U": (placement, placement), "s": rep, "Vh": rep, "z": (Replicate(), Partial())}
    if dim in (1, -1):
        return {"U": rep, "s": rep, "Vh": (Shard(1), Shard(1)), "z": (Replicate(), Partial())}
    if isinstance(placement, Replicate):
        return {"U": rep, "s": rep, "Vh": rep, "z": (Replicate(), grad)}
    raise ValueError(f"no SVF placement for a weight placed as {placement}")


def expand_svf_specs(module: nn.Module, params: dict[str, tuple]) -> dict[str, tuple]:
    """Parameter specs with every `<linear>.weight` of an SVFLinear replaced by its factors' specs."""
    out: dict[str, tuple] = {}
    for name, (placement, grad) in params.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if isinstance(owner, SVFLinear) and leaf == "weight":
            prefix = f"{owner_name}." if owner_name else ""
            out.update({prefix + k: v for k, v in _svf_placements(placement, grad).items()})
        else:
            out[name] = (placement, grad)
    return out


def _place_svf(module: SVFLinear, mesh: DeviceMesh, weight: Placement, bias: Placement) -> None:
    for name, (placement, _) in _svf_placements(weight, Replicate()).items():
        distribute_param(module, name, mesh, placement)
    if module.bias is not None:
        distribute_param(module, "bias", mesh, bias)


class SVFColwiseParallel(ColwiseParallel):
    """ColwiseParallel for an SVFLinear: U (W's rows) and the bias sharded, s, V^T, z replicated."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, lambda n, m, mesh: _place_svf(m, mesh, Shard(0), Shard(0)) if m is module else None,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class SVFRowwiseParallel(RowwiseParallel):
    """RowwiseParallel for an SVFLinear: V^T (W's columns) sharded, U, s, z and the bias replicated."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module, device_mesh, lambda n, m, mesh: _place_svf(m, mesh, Shard(1), Replicate()) if m is module else None,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


def svf_style(module: nn.Module, style: ParallelStyle) -> ParallelStyle:
    """The SVF form of a linear style when `module` is an SVFLinear (same layouts), else `style`."""
    if not isinstance(module, SVFLinear) or type(style) not in (ColwiseParallel, RowwiseParallel):
        return style
    cls = SVFColwiseParallel if type(style) is ColwiseParallel else SVFRowwiseParallel
    new = cls.__new__(cls)
    new.__dict__.update(style.__dict__)
    return new


class PlaceParams(ParallelStyle):
    """Only place the named parameters (no hooks): for tensors the module feeds to parallel
    linears itself, which take DTensor inputs (e.g. Titans' persistent tokens)."""

    def __init__(self, params: dict[str, Placement]):
        super().__init__()
        self.params = params

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, placement in self.params.items():
            distribute_param(*_resolve(module, name), device_mesh, placement)
        return module


class ReplicateParams(ParallelStyle):
    """Parameters become Replicate DTensors; the module computes on DTensor inputs as written
    (norms without sequence parallelism, replicated compute on the replicated residual)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, _ in list(module.named_parameters()):
            distribute_param(*_resolve(module, name), device_mesh, Replicate())
        return module


def redistribute_output(module: nn.Module, placement: Placement) -> None:
    """After `module`'s forward, redistribute its DTensor output to `placement` (kept a DTensor)."""
    def hook(mod, args, output):
        return output.redistribute(placements=[placement]) if isinstance(output, DTensor) else output
    module.register_forward_hook(hook)


def finalize_grads(model: nn.Module) -> None:
    """Each DTensor parameter's gradient is redistributed to the parameter's placement as it is
    produced (a Partial gradient of a Replicate parameter is summed over the tp ranks)."""
    for p in model.parameters():
        if isinstance(p, DTensor) and p.requires_grad:
            placements = p.placements

            def hook(g, placements=placements):
                if isinstance(g, DTensor) and tuple(g.placements) != tuple(placements):
                    return g.redistribute(placements=placements)
                return g
            p.register_hook(hook)
