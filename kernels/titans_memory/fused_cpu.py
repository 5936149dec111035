"""The Titans memory chunk chain as one fused C loop on CPU (`csrc/chunk_memory.c`, built by kernels/native.py).

The plain-PyTorch chain (chunk.py) runs ~30 small framework ops per chunk forward and ~60 backward
on [B*H, b, d] tiles; at the sizes Titans runs on CPU (b = 16, D = 64) their dispatch costs more
than their arithmetic. Here a task (one batch row and head) keeps its memory weights and momentum
in cache for the whole chain and runs every product through a register-blocked loop. Forward
stores each chunk's starting weights and momentum, as the PyTorch chain does; backward recomputes
the chunk's activations from them and walks the chunks in reverse (README.md has the math; the
C file the loop). Tasks run on `torch.get_num_threads()` OpenMP threads.

Same contract as chunk.py's `ChunkMemoryFunction`, which `chunk_titans_memory` runs instead where
the library cannot be built (or `backend="torch"`).
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
    """forward(activation, L, q, k, v [BH, N, b, D], c_M0, c_S0_M, c_S0_S [BH, N], c_g_M, c_g_S
    [BH, N, b], *W (L tensors [BH, d_in, d_out]), *S (L tensors, same shapes))
    -> (o [BH, N, b, D_L], *W_final, *S_final). Saves the inputs and each chunk's starting W and
    S; writes nothing it saved (a retained graph can be backpropagated twice)."""

    @staticmethod
    def forward(ctx, activation, L, q, k, v, c_M0, c_S0_M, c_S0_S, c_g_M, c_g_S, *WS):
        BH, N, b, _ = q.shape
        q, k, v = (t.contiguous() for t in (q, k, v))
        c = torch.stack([c_g_M, c_g_S], -1).contiguous()
        c_M0, c_S0_M, c_S0_S = (t.contiguous() for t in (c_M0, c_S0_M, c_S0_S))
        W0, S0 = [w.contiguous() for w in WS[:L]], [s.contiguous() for s in WS[L:]]
        check_inputs("Titans memory chunk chain", q, k, v, c, c_M0, c_S0_M, c_S0_S, *W0, *S0)
        widths = [W0[0].shape[1]] + [w.shape[2] for w in W0]
        o = q.new_empty(BH, N, b, widths[-1])
        W_out, S_out = [torch.empty_like(w) for w in W0], [torch.empty_like(w) for w in W0]
        W_st = [q.new_empty(BH, N, *w.shape[1:]) for w in W0]
        S_st = [q.new_empty(BH, N, *w.shape[1:]) for w in W0]
        wid = torch.tensor(widths, dtype=torch.int64)
        kernel(SOURCE, "titans_chunk_fwd", q.dtype)(
            ptr(q), ptr(k), ptr(v), ptr(c_M0), ptr(c_S0_M), ptr(c_S0_S), ptr(c), ptr(wid), _i64(L),
            _ptrs(W0), _ptrs(S0), _ptrs(W_out), _ptrs(S_out), _ptrs(W_st), _ptrs(S_st), ptr(o),
            _i64(BH), _i64(N), _i64(b), _int(ACTIVATION_CODES[activation]), _int(torch.get_num_threads()))
        ctx.activation, ctx.L = activation, L
        ctx.save_for_backward(q, k, v, c_M0, c_S0_M, c_S0_S, c, wid, *W_st, *S_st)
        return (o, *W_out, *S_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, *dWS):
        q, k, v, c_M0, c_S0_M, c_S0_S, c, wid, *WS_st = ctx.saved_tensors
        L = ctx.L
        W_st, S_st = WS_st[:L], WS_st[L:]
        BH, N, b, _ = q.shape
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dWf = [None if g is None else g.contiguous() for g in dWS[:L]]
        dSf = [None if g is None else g.contiguous() for g in dWS[L:]]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dcM0, dcS0M, dcS0S = (torch.empty_like(c_M0) for _ in range(3))
        dc = torch.empty_like(c)
        dW0 = [q.new_empty(BH, *w.shape[2:]) for w in W_st]
        dS0 = [q.new_empty(BH, *w.shape[2:]) for w in W_st]
        kernel(SOURCE, "titans_chunk_bwd", q.dtype)(
            ptr(q), ptr(k), ptr(v), ptr(c_M0), ptr(c_S0_M), ptr(c_S0_S), ptr(c), ptr(wid), _i64(L),
            _ptrs(W_st), _ptrs(S_st), ptr(do), _ptrs(dWf), _ptrs(dSf), ptr(dq), ptr(dk), ptr(dv),
            ptr(dcM0), ptr(dcS0M), ptr(dcS0S), ptr(dc), _ptrs(dW0), _ptrs(dS0),
            _i64(BH), _i64(N), _i64(b), _int(ACTIVATION_CODES[ctx.activation]), _int(torch.get_num_threads()))
        return (None, None, dq, dk, dv, dcM0, dcS0M, dcS0S, dc[..., 0], dc[..., 1], *dW0, *dS0)
