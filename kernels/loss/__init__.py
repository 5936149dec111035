"""Linear + cross-entropy that never forms the [tokens, vocab] logits: the LM head and its loss.

`linear_cross_entropy(x, weight, targets)` equals `F.cross_entropy(x @ weight.T, targets)` (mean
over the targets that are not `ignore_index`) but runs in token chunks: each chunk's logits
[chunk, V] are formed, turned into the loss and, in place, into their gradient (softmax - one-hot),
then multiplied back into dx and dweight and dropped. Forward therefore also does the backward's
matmuls; the autograd backward only scales the saved dx and dweight by the incoming gradient.
Peak memory is one chunk of logits instead of all of them (at 8k tokens and a 128k vocabulary,
4 GB of float32 logits and as much again for their gradient).

Paths (kernels/dispatch.py): on CUDA the per-chunk softmax / loss / gradient is one Triton kernel
(triton.py, one pass to find the log-sum-exp, one to write the gradient over the logits in place);
elsewhere the same chunk loop in PyTorch ops. Tested against naive.py.

Not the vocabulary-parallel loss: with the head sharded over tensor-parallel ranks the trainer
keeps parallel/tp_loss.py (the log-sum-exp needs a reduction across ranks).
"""

from __future__ import annotations

import math

import torch

from titanforge.kernels.dispatch import pick
from titanforge.kernels.loss.naive import linear_cross_entropy_reference

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "default_chunk"]


def default_chunk(M: int, C: int, V: int) -> int:
    """Tokens per chunk: the chunk's logits about as large as x itself (ceil(M / ceil(V / C)))."""
    return max(1, math.ceil(M / max(1, math.ceil(V / C))))


def _ce_chunk_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                    grad: bool) -> torch.Tensor:
    """Row losses [m] float32 of logits [m, V]; with grad, logits is overwritten by softmax - one-hot
    (zero rows where the target is ignored)."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    loss = torch.where(valid, lse - lf.gather(1, safe[:, None])[:, 0], 0.0)
    if grad:
        p = torch.exp(lf - lse[:, None])
        p.scatter_add_(1, safe[:, None], -torch.ones_like(p[:, :1]))
        p *= valid[:, None]
        logits.copy_(p)
    return loss


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk, use_triton):
        M, C = x.shape
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if use_triton:
            from titanforge.kernels.loss.triton import ce_chunk_triton as ce_chunk
        else:
            ce_chunk = _ce_chunk_torch
        losses = torch.empty(M, device=x.device, dtype=torch.float32)
        dx = torch.empty_like(x) if grad else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if grad else None
        for s in range(0, M, chunk):
            xc = x[s:s + chunk]
            logits = xc @ weight.t()  # [m, V]
            losses[s:s + chunk] = ce_chunk(logits, targets[s:s + chunk], ignore_index, grad)
            if grad:
                torch.matmul(logits, weight, out=dx[s:s + chunk])
                dw += (logits.t() @ xc).float()
        n = (targets != ignore_index).sum().clamp_min(1).to(torch.float32)
        if grad:
            ctx.save_for_backward(dx, dw, n)
            ctx.weight_dtype = weight.dtype
        return losses.sum() / n

    @staticmethod
    def backward(ctx, dloss):
        dx, dw, n = ctx.saved_tensors
        scale = dloss / n
        return dx * scale.to(dx.dtype), (dw * scale).to(ctx.weight_dtype), None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_size: int = 0, backend: str = "auto") -> torch.Tensor:
    """Mean cross-entropy of logits x [..., C] @ weight [V, C]^T against targets [...] (long), skipping
    targets equal to ignore_index, in chunks of `chunk_size` tokens (0: `default_chunk`). The loss is
    float32; gradients reach x and weight. backend: kernels/dispatch.py ("auto", "triton", "torch")."""
    if x.shape[:-1] != targets.shape or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear_cross_entropy: need x [..., C], weight [V, C], targets [...] with x's leading "
                         f"shape; got x {tuple(x.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}")
    if chunk_size < 0:
        raise ValueError(f"linear_cross_entropy: chunk_size={chunk_size} must be >= 0 (0 picks one)")
    x2, t2 = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    # Under autocast the matmuls run in its dtype, as the unfused head's would; the op itself runs
    # with autocast off (its out= matmuls and float32 dweight sum need fixed dtypes).
    dev = x2.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x2.dtype
    x2, weight = x2.to(dtype), weight.to(dtype)
    path = pick("linear_cross_entropy", backend, x2, weight)
    chunk = chunk_size or default_chunk(*x2.shape, weight.shape[0])
    with torch.autocast(dev, enabled=False):
        return LinearCrossEntropyFunction.apply(x2, weight, t2, ignore_index, chunk, path == "triton")
