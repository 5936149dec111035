"""The per-chunk softmax cross-entropy of the fused linear + cross-entropy as one Triton kernel.

One program per row of a chunk's logits [m, V]: a first pass over V in blocks keeps the running
max and sum of exponentials (the online log-sum-exp), giving the row's loss lse - logit[target];
a second pass overwrites the logits with their gradient softmax - one-hot (zeros for an ignored
target), in the logits' own storage, so the chunk needs no second [m, V] buffer. Arithmetic in
float32. Registered as `titanforge::cross_entropy_chunk` (mutating the logits) so torch.compile
keeps it as one node.

Axis glossary: m rows of the chunk, V vocabulary; BV vocabulary entries per block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from titanforge.kernels.dispatch import interpreting


@triton.jit
def cross_entropy_fwd_kernel_chunk(LOGITS, TGT, LOSS, V, stride, ignore_index,
                                   GRAD: tl.constexpr, BV: tl.constexpr):
    i_m = tl.program_id(0)
    p_row = LOGITS + i_m.to(tl.int64) * stride
    o_v = tl.arange(0, BV)
    b_max = tl.full([], float("-inf"), tl.float32)
    b_sum = tl.full([], 0., tl.float32)
    for v0 in range(0, V, BV):
        b_x = tl.load(p_row + v0 + o_v, mask=v0 + o_v < V, other=float("-inf")).to(tl.float32)
        b_new = tl.maximum(b_max, tl.max(b_x, axis=0))
        b_sum = b_sum * tl.exp(b_max - b_new) + tl.sum(tl.exp(b_x - b_new), axis=0)
        b_max = b_new
    b_lse = b_max + tl.log(b_sum)
    t = tl.load(TGT + i_m)
    valid = t != ignore_index
    b_xt = tl.load(p_row + t, mask=valid, other=0.).to(tl.float32)
    tl.store(LOSS + i_m, tl.where(valid, b_lse - b_xt, 0.))
    if GRAD:
        for v0 in range(0, V, BV):
            m_v = v0 + o_v < V
            b_x = tl.load(p_row + v0 + o_v, mask=m_v, other=0.).to(tl.float32)
            b_p = tl.exp(b_x - b_lse) - tl.where(v0 + o_v == t, 1., 0.)
            b_p = tl.where(valid, b_p, 0.)
            tl.store(p_row + v0 + o_v, b_p.to(LOGITS.dtype.element_ty), mask=m_v)


@torch.library.custom_op("titanforge::cross_entropy_chunk", mutates_args=("logits",))
def cross_entropy_chunk(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad: bool) -> torch.Tensor:
    """Row losses [m] float32 of logits [m, V] (rows contiguous); with grad, logits become softmax - one-hot."""
    m, V = logits.shape
    loss = torch.empty(m, device=logits.device, dtype=torch.float32)
    if m:
        BV = min(triton.next_power_of_2(V), 65536 if interpreting() else 4096)
        cross_entropy_fwd_kernel_chunk[(m,)](logits, targets, loss, V, logits.stride(0), ignore_index,
                                             GRAD=grad, BV=BV)
    return loss


@cross_entropy_chunk.register_fake
def _(logits, targets, ignore_index, grad):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def ce_chunk_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad: bool) -> torch.Tensor:
    return cross_entropy_chunk(logits, targets.contiguous(), ignore_index, grad)
