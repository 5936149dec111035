"""Vocab-parallel cross-entropy: the loss over logits sharded on the vocabulary, never gathered.

Megatron-LM's `vocab_parallel_cross_entropy` (Shoeybi et al. 2019, Sec. 3), written against a
DeviceMesh instead of Megatron's global process groups: each rank holds logits [N, V/tp] for its
slice of the vocabulary; three all-reduces of [N]-sized vectors (max, sum of exponentials, target
logit) give the exact loss. The backward needs no communication: d loss / d z = softmax(z) -
onehot(target), and each rank forms it for its own slice.

`torch.distributed.tensor.parallel.loss_parallel` does the same through DTensor, but it requires
the backward to run inside its context too; a plain function fits the trainer's step unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, targets, vocab_start, group, ignore_index):
        # z [N, V_local] (this rank's vocabulary slice), targets [N] global ids.
        ctx.dtype = z.dtype
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        m = z.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(z - m[:, None])
        s = e.sum(-1)
        dist.all_reduce(s, group=group)
        local_t = targets - vocab_start
        mine = (local_t >= 0) & (local_t < z.shape[-1])
        idx = local_t.clamp(0, z.shape[-1] - 1)
        z_t = torch.where(mine, z.gather(1, idx[:, None])[:, 0], torch.zeros_like(m))
        dist.all_reduce(z_t, group=group)
        valid = targets != ignore_index
        n_valid = valid.sum().clamp_min(1)
        loss = torch.where(valid, torch.log(s) + m - z_t, torch.zeros_like(m)).sum() / n_valid
        ctx.save_for_backward(e, s, idx, mine, valid, n_valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        e, s, idx, mine, valid, n_valid = ctx.saved_tensors
        g = e / s[:, None]
        g.scatter_add_(1, idx[:, None], -mine.to(g.dtype)[:, None])
        g = g * (valid.to(g.dtype) * grad_loss / n_valid)[:, None]
        return g.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                 group, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over targets != ignore_index; local_logits [N, V_local] hold vocabulary
    ids [vocab_start, vocab_start + V_local); targets [N]. Identical scalar on every rank."""
    return _VocabParallelCrossEntropy.apply(local_logits, targets, vocab_start, group, ignore_index)


def tp_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp_mesh: DeviceMesh | None = None,
                     ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy for logits [B, T, V] and targets [B, T], TP or not.

    Logits sharded on the vocabulary (a DTensor placed Shard(-1), what `apply_tensor_parallel`
    makes with loss_parallel=True) are reduced with `vocab_parallel_cross_entropy`; any other
    DTensor is gathered; a plain tensor goes to F.cross_entropy. Use it where F.cross_entropy was.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree; "
                         f"pass logits [B, T, V] and targets [B, T]")
    if isinstance(logits, DTensor):
        pl = logits.placements[0]
        if isinstance(pl, Shard) and pl.dim in (-1, logits.ndim - 1):
            mesh = tp_mesh if tp_mesh is not None else logits.device_mesh
            local = logits.to_local()
            V_local = local.shape[-1]
            start = mesh.get_local_rank() * V_local
            return vocab_parallel_cross_entropy(local.reshape(-1, V_local), targets.reshape(-1), start,
                                                mesh.get_group(), ignore_index)
        logits = logits.full_tensor()
    # float32 at least (as the trainer does), float64 kept for exact reference tests.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
