"""Expert parallelism (EP): each rank of the "ep" mesh holds E/ep experts of every MoE layer.

Follows torchtitan's `ExpertParallel` (torchtitan/distributed/expert_parallel.py): the experts'
stacked weights w1, w3 [E, C, H] and w2 [E, H, C] become `Shard(0)` DTensors over mesh["ep"]
(parameter names unchanged, so DCP checkpoints reshard between ep=2 and one process), and the
`GroupedExperts` forward, which receives rows already sorted into per-expert segments, becomes

    counts [E] --all-to-all--> counts_recv [ep, E/ep]          (rows each rank sends me, per local expert)
    x_sorted --all-to-all (autograd)--> rows grouped (source rank, local expert)
    reorder to (local expert, source rank): local-expert-contiguous segments
    expert_forward on the local experts
    reverse the reorder, reverse all-to-all                     -> y_sorted in the caller's order

Dropless: the splits are whatever the router chose (variable counts). Everything before
(router, auxiliary losses, capacity, sort) and after (combine) stays in the model and runs on each
rank's own tokens, exactly as under data parallelism:

- the load-balancing and z losses and the metrics are per rank, over that rank's micro-batch;
- the capacity of `moe.capacity_factor` is computed from the rank's own tokens and applied
  before dispatch, so the same assignments are dropped as in one process running that rank's
  micro-batch (no global capacity across the ep group, which would need another exchange).

Gradients. Rank r's loss is the mean over its own tokens; the global loss is the mean of the dp
ranks' losses. A non-expert weight's gradient on rank r is that of its own loss, so data
parallelism averages it over all of "dp". A local expert's gradient is the SUM over the ep group
of every rank's loss (the reverse all-to-all brings each rank's output gradients to the owner).
The forward scales the experts' weight gradients by 1/ep inside the backward (`_ScaleGrad`),
making them the mean over the ep group; the mean over "dp_rep" (FSDP2 over mesh["dp_rep"] or
`reduce_expert_grads` after a DDP backward) then gives sum / (dp_rep * ep) = sum / dp, the
single-process gradient of the global mean loss. Scaling in the graph needs no FSDP divide-factor
override and holds at dp_rep=1, where nothing else touches the experts' gradients.

Modules never hold process groups (STYLE.md section 3) except the ones this file swaps in, as
FSDP2 swaps its own classes in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from titanforge.models.common.moe import GroupedExperts
from titanforge.models.common.moe_dispatch import expert_forward

EXPERT_WEIGHTS = ("w1", "w3", "w2")


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _local_expert_order(counts_recv: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Row permutation from (source rank, local expert) blocks to (local expert, source rank).

    counts_recv: [ep, L] rows received from each rank for each local expert, in received order;
    n_rows: their sum (known on the host). Returns `perm` [n_rows] with received[perm]
    local-expert-contiguous (within an expert, sources in rank order).
    """
    ep, L = counts_recv.shape
    flat = counts_recv.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).view(ep, L)  # where block (r, j) begins
    counts_t, starts_t = counts_recv.t().reshape(-1), starts.t().reshape(-1)  # blocks in (j, r) order
    block_begin = torch.repeat_interleave(torch.cumsum(counts_t, 0) - counts_t, counts_t, output_size=n_rows)
    offset_in_block = torch.arange(n_rows, device=flat.device) - block_begin
    return torch.repeat_interleave(starts_t, counts_t, output_size=n_rows) + offset_in_block


class ExpertParallelGroupedExperts(GroupedExperts):
    """`GroupedExperts` whose weights are `Shard(0)` over `ep_mesh`; the forward dispatches rows to
    the ranks owning their experts and brings the outputs back (module docstring)."""

    ep_mesh: DeviceMesh

    # Data-dependent splits and collectives: compiled blocks run this part eagerly.
    @torch.compiler.disable
    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor | list[int]) -> torch.Tensor:
        """x_sorted [M, C] in segments of `counts` [E] rows for the E global experts -> [M, C]."""
        group = self.ep_mesh.get_group()
        ep = self.ep_mesh.size()
        counts = torch.as_tensor(counts, device=x_sorted.device)
        E = counts.numel()
        n_local = self.w1.to_local().shape[0]
        if n_local * ep != E:
            raise ValueError(f"expert parallel: counts has {E} experts but {ep} ranks hold {n_local} each")
        with torch.no_grad():
            counts_recv = torch.empty_like(counts)
            dist.all_to_all_single(counts_recv, counts.contiguous(), group=group)
            counts_recv = counts_recv.view(ep, n_local)
            # One host synchronisation: the all-to-all needs its split sizes on the host.
            splits = torch.stack([counts.view(ep, n_local).sum(1), counts_recv.sum(1)]).tolist()
            input_splits, output_splits = splits
            perm = _local_expert_order(counts_recv, sum(output_splits))
        x_recv = all_to_all_single_autograd(x_sorted.contiguous(), output_splits, input_splits, group)
        x_local = x_recv[perm]  # [M_local, C]
        weights = [_ScaleGrad.apply(getattr(self, n).to_local(), 1.0 / ep) for n in EXPERT_WEIGHTS]
        y_local = expert_forward(x_local, counts_recv.sum(0), *weights)
        if x_local.shape[0] == 0:
            # No rows for my experts: keep the received rows and the weights in the graph, so this
            # rank's backward still runs the reverse of the first all-to-all (the other ranks wait
            # in it for the gradients of the rows they sent) and its experts get zero gradients.
            y_local = y_local + (x_local.sum() + sum(w.sum() for w in weights)) * 0
        y_recv = torch.empty_like(y_local).index_copy(0, perm, y_local) if perm.numel() else y_local
        return all_to_all_single_autograd(y_recv, input_splits, output_splits, group)


def expert_modules(model: nn.Module) -> list[tuple[str, ExpertParallelGroupedExperts]]:
    """The expert-parallel `GroupedExperts` of `model`, by module name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelGroupedExperts)]


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Shard every `GroupedExperts` of `model` over the 1-D mesh `ep_mesh` (in place; returns `model`).

    The weights must be the full, identical initial experts on every rank (same seed), or on meta
    (the trainer's sharded start fills the shards after, parallel/init.py); each rank keeps
    experts [rank * E/ep, (rank + 1) * E/ep).
    """
    if not isinstance(ep_mesh, DeviceMesh) or ep_mesh.ndim != 1:
        raise ValueError(f"apply_expert_parallel: ep_mesh must be a 1-D DeviceMesh (mesh['ep']), got "
                         f"{ep_mesh!r}")
    ep = ep_mesh.size()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, GroupedExperts)]
    if not found:
        raise ValueError(f"apply_expert_parallel: {type(model).__name__} has no mixture-of-experts layers "
                         f"(GroupedExperts); set parallel.ep=1")
    for name, mod in found:
        if isinstance(mod, ExpertParallelGroupedExperts):
            raise ValueError(f"apply_expert_parallel: {name} is already expert parallel; apply it once")
        n_experts = mod.w1.shape[0]
        if n_experts % ep:
            raise ValueError(f"apply_expert_parallel: {name} has {n_experts} experts, not divisible by ep={ep}; "
                             f"choose ep dividing the expert count")
        for w in EXPERT_WEIGHTS:
            param = getattr(mod, w)
            mod.register_parameter(w, nn.Parameter(distribute_tensor(param.data, ep_mesh, [Shard(0)]),
                                                   requires_grad=param.requires_grad))
        mod.__class__ = ExpertParallelGroupedExperts
        mod.ep_mesh = ep_mesh
    return model


def shard_experts_fsdp(model: nn.Module, dp_rep_mesh: DeviceMesh, **fsdp_kwargs) -> None:
    """FSDP2 over mesh["dp_rep"] for each expert-parallel experts module, before `apply_fsdp(model, mesh["dp"])`.

    Each experts module becomes its own FSDP unit, so the enclosing blocks' units (over all of
    "dp") leave its parameters alone; their gradients are averaged over dp_rep (the 1/ep is in
    the graph). With dp_rep=1 the unit shards over one rank: it only keeps the experts out of the
    "dp" units. `fsdp_kwargs` (mp_policy, reshard_after_forward, ...) go to `fully_shard`.
    """
    from torch.distributed.fsdp import fully_shard

    for _, mod in expert_modules(model):
        fully_shard(mod, mesh=dp_rep_mesh, **fsdp_kwargs)


def ignore_experts_in_ddp(model: nn.Module, dp_rep_mesh: DeviceMesh) -> None:
    """Before DDP: exclude the experts' parameters from DDP's all-reduce over "dp".

    `reduce_expert_grads` then averages their gradients over "dp_rep" after the backward.
    Names are taken now, after activation checkpointing / compile have set their prefixes.
    """
    names = {n for n, p in model.named_parameters()
             if any(p is getattr(m, w) for _, m in expert_modules(model) for w in EXPERT_WEIGHTS)}
    model._ddp_params_and_buffers_to_ignore = sorted(names)
    for _, mod in expert_modules(model):
        mod.dp_rep_mesh = dp_rep_mesh


def reduce_expert_grads(model: nn.Module) -> None:
    """DDP layouts: average the experts' gradients over "dp_rep" (no-op for dp_rep=1 or FSDP).

    Call once per optimizer step, after the last micro-batch's backward, on every rank.
    """
    for _, mod in expert_modules(model):
        mesh = getattr(mod, "dp_rep_mesh", None)
        if mesh is None or mesh.size() == 1:
            continue
        for w in EXPERT_WEIGHTS:
            grad = getattr(mod, w).grad
            if grad is None:
                raise RuntimeError(f"reduce_expert_grads: expert weight {w} has no gradient; call it after backward")
            local = grad.to_local()
            dist.all_reduce(local, group=mesh.get_group())
            local.div_(mesh.size())
