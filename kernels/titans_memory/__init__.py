"""Titans neural long-term memory update (Behrouz et al. 2025): public API.

`chunk_titans_memory` is the chunk-parallel op (its chunk chain a fused C loop on CPU, fused_cpu.py,
a Triton kernel on CUDA, triton.py, else plain torch, chunk.py; kernels/dispatch.py's rule, op
"titans_memory"),
`naive_titans_memory` the token loop it is tested against, and `titans_memory_retrieve` the read
y = M*(q) without an update. The math is in README.md.
"""

from __future__ import annotations

import torch

from titanforge.kernels import dispatch
from titanforge.kernels.titans_memory import fused_cpu
from titanforge.kernels.titans_memory.chunk import ACTIVATIONS, chunk_titans_memory_fwd, mlp_apply
from titanforge.kernels.titans_memory.inputs import titans_memory_inputs
from titanforge.kernels.titans_memory.naive import naive_titans_memory


def titans_triton_fits(q: torch.Tensor, weights, activation: str) -> bool:
    """Whether the Triton chain takes this memory (triton.py's `fits`, without importing triton)."""
    return (len(weights) <= 2 and activation in ("silu", "gelu") and q.shape[-1] <= 128
            and all(max(w.shape[-2:]) <= 128 for w in weights))

State = tuple[list[torch.Tensor], list[torch.Tensor]]
# Where a token reads the memory: its own per-token weights M_t, or its chunk's starting weights.
READS = ("token", "chunk")


def _check_weights(weights, B: int, H: int, Dk: int, Dv: int, name: str = "weights") -> None:
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(f"{name} must be a non-empty list of per-layer tensors [H, d_in, d_out] or "
                         f"[B, H, d_in, d_out]; got {type(weights).__name__}")
    d_in = Dk
    for i, w in enumerate(weights):
        if w.dim() not in (3, 4) or w.shape[-3] != H or (w.dim() == 4 and w.shape[0] != B):
            raise ValueError(f"{name}[{i}] has shape {tuple(w.shape)}; expected [H={H}, d_in, d_out] or "
                             f"[B={B}, H={H}, d_in, d_out]")
        if w.shape[-2] != d_in:
            raise ValueError(f"{name}[{i}] has d_in={w.shape[-2]} but the previous layer (or the key "
                             f"dim) gives {d_in}; chain layer widths d_in -> d_out")
        d_in = w.shape[-1]
    if d_in != Dv:
        raise ValueError(f"the last memory layer outputs {d_in} features but v has head dim {Dv}; "
                         f"make the last layer's d_out equal Dv")


def chunk_titans_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor,
                        eta: torch.Tensor, alpha: torch.Tensor, *, weights: list[torch.Tensor],
                        momentum: list[torch.Tensor] | None = None, chunk_size: int = 16,
                        activation: str = "silu", compile: bool = False, backend: str = "auto",
                        read_after: torch.Tensor | None = None, inner_grad_clip: float | None = None,
                        read: str = "token"):
    """Run the Titans memory over a sequence, chunk by chunk.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; theta (step size), eta (momentum decay), alpha (forget
    gate): [B, T, H], per token. weights: initial memory MLP, one tensor per layer, [H, d_in, d_out]
    (learnable init shared over the batch) or [B, H, d_in, d_out] (a carried state); layer i is
    followed by `activation` except the last. momentum: like weights ([B, H, ...]) or None (zeros).

    Every token of a chunk takes its gradient at the weights at its chunk's start (Sec. 3.2's
    mini-batch form); the weights still move token by token. read="token" (default) retrieves
    y_t = M_t(q_t) from the weights after token t's update (the paper's per-token read, computed in
    the dual form without forming per-token weights); read="chunk" retrieves M_0(q_t) from the
    chunk-start weights (cheaper: no per-token term; a token sees nothing of its own chunk).
    Returns o [B, T, H, Dv] and the final state
    (weights, momentum) as lists of [B, H, d_in, d_out]; passing it back as initial state continues
    the sequence exactly when the first piece's length is a multiple of chunk_size.
    Computes in float32 (float64 if given); o has q's dtype. compile=True runs the chunk chain's
    forward and backward through torch.compile (opt-in: a one-off compile of minutes on CPU).
    backend (kernels/dispatch.py, op "titans_memory"): "auto" runs the chunk chain in the Triton kernel
    (triton.py) for CUDA tensors of a memory it takes (depth <= 2, widths <= 128), in the fused C loop
    (fused_cpu.py) for CPU float32/float64 inputs where it builds (and compile is off), else in
    PyTorch; "triton" insists on the kernel (CPU tensors under TRITON_INTERPRET=1), "native" on the
    C loop, "torch" on PyTorch.
    inner_grad_clip: tau > 0 scales each token's inner gradient (all layers together, per batch row
    and head) by min(1, tau / ||grad||) before it enters the momentum (titans-pytorch's
    max_grad_norm, a hard clip): the memory's update per token is bounded whatever the inputs and
    gates (README.md). None or 0: no clip.
    read_after: queries [B, Tr, H, Dk] to read from the final memory, M_final(read_after) (what MAC
    retrieves for the next segment); when given, returns (o, state, read) [B, Tr, H, Dv], the read
    fused into the C loop's call.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, T, H, Dk] and v [B, T, H, Dv] with equal B, T, H; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, H, Dk = q.shape
    if T == 0:
        raise ValueError("empty sequence (T = 0); pass at least one token")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if g.shape != (B, T, H):
            raise ValueError(f"{name} has shape {tuple(g.shape)}; gates are per token and head, [B, T, H] = "
                             f"{(B, T, H)} (broadcast coarser gates before calling)")
    if read not in READS:
        raise ValueError(f"read={read!r} must be one of {READS} (per-token weights, or the chunk-start weights)")
    if inner_grad_clip is not None and not inner_grad_clip >= 0:
        raise ValueError(f"inner_grad_clip={inner_grad_clip!r} must be None, 0 (off) or a positive norm")
    clip = float(inner_grad_clip or 0.0)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {list(dispatch.BACKENDS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
    _check_weights(weights, B, H, Dk, v.shape[-1])
    if read_after is not None and (read_after.dim() != 4 or read_after.shape[0] != B or read_after.shape[2:] != (H, Dk)):
        raise ValueError(f"read_after must be [B={B}, Tr, H={H}, Dk={Dk}]; got {tuple(read_after.shape)}")
    if momentum is not None:
        if len(momentum) != len(weights):
            raise ValueError(f"momentum has {len(momentum)} layers but weights has {len(weights)}")
        for i, (m, w) in enumerate(zip(momentum, weights)):
            if tuple(m.shape) != (B, H, *w.shape[-2:]):
                raise ValueError(f"momentum[{i}] has shape {tuple(m.shape)}; expected {(B, H, *w.shape[-2:])}")
    dtype = torch.promote_types(q.dtype, torch.float32)
    ws = [w.to(dtype) for w in weights]
    ms = None if momentum is None else [m.to(dtype) for m in momentum]
    qkv, gates = [t.to(dtype) for t in (q, k, v)], [g.to(dtype) for g in (theta, eta, alpha)]
    if backend == "native" and len(weights) > fused_cpu.MAX_LAYERS:
        raise ValueError(f"backend='native' runs memories of up to {fused_cpu.MAX_LAYERS} layers, got {len(weights)}")
    path = dispatch.pick("titans_memory", backend, *qkv, *gates, *ws, *(ms or ()), read_after,
                         native_source=fused_cpu.SOURCE)
    if path == "triton" and not titans_triton_fits(q, weights, activation):
        if dispatch.resolve("titans_memory", backend) == "triton":
            raise ValueError(f"titans_memory: backend='triton' runs memories of depth <= 2 with every width <= 128 "
                             f"and silu/gelu, got depth {len(weights)}, widths "
                             f"{[tuple(w.shape[-2:]) for w in weights]}, {activation}; use backend='auto'")
        path = "torch"
    if path == "native" and (compile or len(weights) > fused_cpu.MAX_LAYERS):
        path = "torch"
    if path == "native":
        o, state, after = fused_cpu.fused_chunk_titans_memory(
            *qkv, *gates, ws, ms, chunk_size, activation, None if read_after is None else read_after.to(dtype), clip,
            read)
        return (o.to(q.dtype), state) if read_after is None else (o.to(q.dtype), state, after.to(q.dtype))
    # [B, H, T, D] so a chunk is a contiguous slice of the matmul batch.
    q_, k_, v_ = (t.transpose(1, 2) for t in qkv)
    th, et, al = (g.transpose(1, 2) for g in gates)
    o, state = chunk_titans_memory_fwd(q_, k_, v_, th, et, al, ws, ms, chunk_size, activation, compile, clip, read,
                                       use_triton=path == "triton")
    o = o.transpose(1, 2).to(q.dtype)
    if read_after is None:
        return o, state
    return o, state, titans_memory_retrieve(read_after, state[0], activation)


def titans_memory_retrieve(q: torch.Tensor, weights: list[torch.Tensor], activation: str = "silu") -> torch.Tensor:
    """y = M*(q) (Eq. 15) with no update. q [B, T, H, Dk]; weights as in chunk_titans_memory -> [B, T, H, Dv]."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, Dk]; got {tuple(q.shape)}")
    B, T, H, Dk = q.shape
    _check_weights(weights, B, H, Dk, weights[-1].shape[-1] if weights else 0)
    dtype = torch.promote_types(q.dtype, torch.float32)
    y = mlp_apply([w.to(dtype) for w in weights], q.to(dtype).transpose(1, 2), ACTIVATIONS[activation][0])
    return y.transpose(1, 2).to(q.dtype)


__all__ = ["chunk_titans_memory", "naive_titans_memory", "titans_memory_retrieve", "titans_memory_inputs", "State"]
