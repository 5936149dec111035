"""The Titans memory chunk chain as one fused C loop on CPU (`csrc/chunk_memory.c`, built by kernels/native.py).

The plain-PyTorch chain (chunk.py) runs ~30 small framework ops per chunk forward and ~60 backward
on [B*H, b, d] tiles, plus the gate coefficients and the layout changes around them; at the sizes
Titans runs on CPU (b = 16, D = 64) their dispatch costs more than their arithmetic. Here a task
(one batch row and head) keeps its memory weights and momentum in cache for the whole chain and
runs every product through a register-blocked loop. It reads q, k, v and the gates in the model's
[B, T, H, D] layout through their strides, computes each chunk's gate coefficients itself, and
forward stores each chunk's starting weights and momentum; backward recomputes the chunk's
activations from them, walks the chunks in reverse and returns the gates' gradients too
(README.md has the math; the C file the loop). Tasks run on `torch.get_num_threads()` OpenMP
threads.

`chunk_titans_memory` runs this where the library builds (backend "auto" or "native"), else
chunk.py's `ChunkMemoryFunction`; both are tested against the token loop of naive.py.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from titanforge.kernels.native import check_inputs, kernel, load, native_status, ptr

SOURCE = str(Path(__file__).with_name("csrc") / "chunk_memory.c")
# Layers the C loop handles (MAXL in csrc/chunk_memory_impl.h).
MAX_LAYERS = 16
ACTIVATION_CODES = {"silu": 0, "gelu": 1}

_i64, _int = ctypes.c_int64, ctypes.c_int


def available() -> bool:
    return load(SOURCE) is not None


def status() -> str:
    return native_status(SOURCE)


def _ptrs(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers (None -> NULL)."""
    return (ctypes.c_void_p * len(tensors))(*(None if t is None else t.data_ptr() for t in tensors))


class FusedChunkMemoryFunction(torch.autograd.Function):
    """forward(activation, L, chunk_size, clip (0: off), q, k [B, T, H, Dk], v [B, T, H, Dv], theta, eta, alpha
    [B, T, H], q_read [B, Tr, H, Dk] or None, *W (L tensors [H, d_in, d_out] or [B, H, d_in, d_out]),
    *S (L tensors [B, H, d_in, d_out], or L Nones: zero momentum))
    -> (o [B, T, H, Dv], o_read [B, Tr, H, Dv] (empty without q_read), *W_final, *S_final).

    Takes the model's [B, T, H, D] layout through strides (only the last dim must be contiguous),
    so q, k, v and the gates are neither transposed nor copied, and computes each chunk's gate
    coefficients itself (chunk.py's `chunk_coefficients`, and their gradients in backward); a ragged
    last chunk is just a shorter chunk. o_read = M_final(q_read) is the read after the chain (MAC
    reads the next segment's queries from the memory this segment leaves). Saves the inputs and
    each chunk's starting W and S (and W_final for the read); writes nothing it saved (a retained
    graph can be backpropagated twice)."""

    @staticmethod
    def forward(ctx, activation, L, chunk_size, clip, q, k, v, theta, eta, alpha, q_read, *WS):
        B, T, H, _ = q.shape
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        if q_read is not None and q_read.stride(-1) != 1:
            q_read = q_read.contiguous()
        W0 = [w.contiguous() for w in WS[:L]]
        S0 = None if WS[L] is None else [s.contiguous() for s in WS[L:]]
        check_inputs("Titans memory chunk chain", q, k, v, theta, eta, alpha, q_read, *W0, *(S0 or []))
        batched = W0[0].dim() == 4
        widths = [W0[0].shape[-2]] + [w.shape[-1] for w in W0]
        N = -(-T // chunk_size)
        Tr = 0 if q_read is None else q_read.shape[1]
        o = q.new_empty(B, T, H, widths[-1])
        o_read = q.new_empty(B, Tr, H, widths[-1])
        W_out = [q.new_empty(B, H, *w.shape[-2:]) for w in W0]
        S_out = [q.new_empty(B, H, *w.shape[-2:]) for w in W0]
        W_st = [q.new_empty(B * H, N, *w.shape[-2:]) for w in W0]
        S_st = [q.new_empty(B * H, N, *w.shape[-2:]) for w in W0]
        wid = torch.tensor(widths, dtype=torch.int64)
        strided = (q, k, v, theta, eta, alpha, q_read if q_read is not None else q)
        strides = torch.tensor([s for t in strided for s in t.stride()[:3]], dtype=torch.int64)
        kernel(SOURCE, "titans_chunk_fwd", q.dtype)(
            ptr(q), ptr(k), ptr(v), ptr(theta), ptr(eta), ptr(alpha), ptr(strides), ptr(wid), _i64(L),
            _ptrs(W0), _int(int(batched)), None if S0 is None else _ptrs(S0), _ptrs(W_out), _ptrs(S_out),
            _ptrs(W_st), _ptrs(S_st), ptr(o), ptr(q_read), _i64(Tr), ptr(o_read if Tr else None),
            _i64(B), _i64(H), _i64(T), _i64(chunk_size), _int(ACTIVATION_CODES[activation]),
            ctypes.c_double(clip), _int(torch.get_num_threads()))
        ctx.activation, ctx.L, ctx.chunk_size, ctx.clip = activation, L, chunk_size, clip
        ctx.batched, ctx.has_momentum = batched, S0 is not None
        ctx.save_for_backward(q, k, v, theta, eta, alpha, q_read, strides, wid, *W_st, *S_st,
                              *(W_out if q_read is not None else ()))
        return (o, o_read, *W_out, *S_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, do_read, *dWS):
        q, k, v, theta, eta, alpha, q_read, strides, wid, *rest = ctx.saved_tensors
        L = ctx.L
        W_st, S_st, W_fin = rest[:L], rest[L:2 * L], rest[2 * L:]
        B, T, H, _ = q.shape
        do = torch.zeros(B, T, H, int(wid[-1]), dtype=q.dtype) if do is None else do.contiguous()
        Tr = 0 if q_read is None else q_read.shape[1]
        if Tr:
            do_read = torch.zeros(B, Tr, H, int(wid[-1]), dtype=q.dtype) if do_read is None else do_read.contiguous()
        dq_read = q.new_empty(B, Tr, H, q.shape[-1]) if q_read is not None else None
        dWf = [None if g is None else g.contiguous() for g in dWS[:L]]
        dSf = [None if g is None else g.contiguous() for g in dWS[L:]]
        dq, dk = q.new_empty(B, T, H, q.shape[-1]), q.new_empty(B, T, H, q.shape[-1])
        dv = q.new_empty(B, T, H, v.shape[-1])
        dth, det, dal = (q.new_empty(B, T, H) for _ in range(3))
        dW0 = [q.new_empty(B, H, *w.shape[2:]) for w in W_st]
        dS0 = [q.new_empty(B, H, *w.shape[2:]) for w in W_st]
        kernel(SOURCE, "titans_chunk_bwd", q.dtype)(
            ptr(q), ptr(k), ptr(v), ptr(theta), ptr(eta), ptr(alpha), ptr(strides), ptr(wid), _i64(L),
            _ptrs(W_st), _ptrs(S_st), ptr(do), _ptrs(dWf), _ptrs(dSf), ptr(dq), ptr(dk), ptr(dv),
            ptr(dth), ptr(det), ptr(dal), _ptrs(dW0), _ptrs(dS0),
            ptr(q_read if Tr else None), _i64(Tr), _ptrs(W_fin) if Tr else None, ptr(do_read if Tr else None),
            ptr(dq_read if Tr else None), _i64(B), _i64(H), _i64(T), _i64(ctx.chunk_size),
            _int(ACTIVATION_CODES[ctx.activation]), ctypes.c_double(ctx.clip), _int(torch.get_num_threads()))
        dW = dW0 if ctx.batched else [g.sum(0) for g in dW0]
        dS = dS0 if ctx.has_momentum else [None] * L
        return (None, None, None, None, dq, dk, dv, dth, det, dal, dq_read, *dW, *dS)


def fused_chunk_titans_memory(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, activation, read_after=None,
                              clip=0.0):
    """chunk_titans_memory's contract on validated float32/float64 CPU inputs, [B, T, H, D] / [B, T, H];
    returns (o, state, M_final(read_after) or None)."""
    L = len(weights)
    out = FusedChunkMemoryFunction.apply(activation, L, chunk_size, clip, q, k, v, theta, eta, alpha, read_after, *weights,
                                         *(momentum if momentum is not None else [None] * L))
    return out[0], (list(out[2:2 + L]), list(out[2 + L:])), (out[1] if read_after is not None else None)
