"""TTT-Linear's and TTT-MLP's dual forms as one fused C loop on CPU (`csrc/ttt.c`, built by kernels/native.py).

chunk.py's `_dual_scan` runs ~25 small framework ops per mini-batch forward and ~60 backward on
[B, H, b, D] tiles; at the sizes TTT runs on CPU (b = 16, D = 64) their dispatch costs more than
their arithmetic. Here a task (one batch row and head) keeps its inner weights in cache for the
whole sequence and runs every product through the register-blocked loops of
kernels/csrc/small_matrix_impl.h. It reads q, k, v and eta in the model's [B, T, H, D] layout
through their strides, stores each mini-batch's starting W and b in forward, and backward
recomputes the mini-batch's activations from them while walking the mini-batches in reverse
(README.md, "Backward", has the derivation). Tasks run on `torch.get_num_threads()` OpenMP threads.

`chunk_ttt_linear` / `chunk_ttt_mlp` run this where the library builds (backend "auto" or
"native"), else chunk.py's PyTorch dual form; both are tested against the token loop of naive.py.
The backward is first-order only (`once_differentiable`). TTT-MLP's loop is the same walk over
both layers (FusedTTTMLPFunction), saving the four state tensors per mini-batch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from titanforge.kernels.native import check_inputs, kernel, load, native_status, ptr

SOURCE = str(Path(__file__).with_name("csrc") / "ttt.c")

_i64, _int = ctypes.c_int64, ctypes.c_int


def available() -> bool:
    return load(SOURCE) is not None


def status() -> str:
    return native_status(SOURCE)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_rc(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f"TTT-Linear C {what}: could not allocate the per-task scratch")


class FusedTTTLinearFunction(torch.autograd.Function):
    """forward(eps, q, k, v [B, T, H, D], eta [B, T, H], token_eta [b], ln_weight, ln_bias [H, D],
    W0 [B, H, D, D], b0 [B, H, D]) -> (z [B, T, H, D], W_final, b_final).

    Takes q, k, v, eta through their strides (only the last dim must be contiguous); saves the
    inputs and each mini-batch's starting W, b ([B*H, N, D, D], [B*H, N, D]); writes nothing it
    saved, so a retained graph can be backpropagated twice."""

    @staticmethod
    def forward(ctx, eps, q, k, v, eta, token_eta, ln_weight, ln_bias, W0, b0):
        B, T, H, D = q.shape
        q, k, v, eta = (_last_contiguous(t) for t in (q, k, v, eta))
        token_eta, ln_weight, ln_bias, W0, b0 = (t.contiguous() for t in (token_eta, ln_weight, ln_bias, W0, b0))
        check_inputs("TTT-Linear chain", q, k, v, eta, token_eta, ln_weight, ln_bias, W0, b0)
        bs = token_eta.shape[0]
        N = -(-T // bs)
        z = q.new_empty(B, T, H, D)
        W_out, b_out = q.new_empty(B, H, D, D), q.new_empty(B, H, D)
        W_st, b_st = q.new_empty(B * H, N, D, D), q.new_empty(B * H, N, D)
        strides = torch.tensor([s for t in (q, k, v) for s in t.stride()[:3]] + list(eta.stride()), dtype=torch.int64)
        rc = kernel(SOURCE, "ttt_linear_fwd", q.dtype)(
            ptr(q), ptr(k), ptr(v), ptr(eta), ptr(strides), ptr(token_eta), ptr(ln_weight), ptr(ln_bias),
            ptr(W0), ptr(b0), ptr(W_out), ptr(b_out), ptr(W_st), ptr(b_st), ptr(z),
            _i64(B), _i64(H), _i64(T), _i64(D), _i64(bs), ctypes.c_double(eps), _int(torch.get_num_threads()))
        _check_rc(rc, "forward")
        ctx.eps = eps
        ctx.save_for_backward(q, k, v, eta, strides, token_eta, ln_weight, ln_bias, W_st, b_st)
        return z, W_out, b_out

    @staticmethod
    @once_differentiable
    def backward(ctx, dz, dW_f, db_f):
        q, k, v, eta, strides, token_eta, ln_weight, ln_bias, W_st, b_st = ctx.saved_tensors
        B, T, H, D = q.shape
        bs = token_eta.shape[0]
        dz = torch.zeros(B, T, H, D, dtype=q.dtype) if dz is None else dz.contiguous()
        dW_f = None if dW_f is None else dW_f.contiguous()
        db_f = None if db_f is None else db_f.contiguous()
        dq, dk, dv = (q.new_empty(B, T, H, D) for _ in range(3))
        deta = q.new_empty(B, T, H)
        dtok = q.new_empty(B * H, bs)
        dgamma, dbeta = q.new_empty(B, H, D), q.new_empty(B, H, D)
        dW0, db0 = q.new_empty(B, H, D, D), q.new_empty(B, H, D)
        rc = kernel(SOURCE, "ttt_linear_bwd", q.dtype)(
            ptr(q), ptr(k), ptr(v), ptr(eta), ptr(strides), ptr(token_eta), ptr(ln_weight), ptr(ln_bias),
            ptr(W_st), ptr(b_st), ptr(dz), ptr(dW_f), ptr(db_f), ptr(dq), ptr(dk), ptr(dv), ptr(deta),
            ptr(dtok), ptr(dgamma), ptr(dbeta), ptr(dW0), ptr(db0),
            _i64(B), _i64(H), _i64(T), _i64(D), _i64(bs), ctypes.c_double(ctx.eps), _int(torch.get_num_threads()))
        _check_rc(rc, "backward")
        return None, dq, dk, dv, deta, dtok.sum(0), dgamma.sum(0), dbeta.sum(0), dW0, db0


def fused_chunk_ttt_linear(q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state, eps):
    """chunk_ttt_linear's contract on validated CPU inputs of one dtype, float32 or float64."""
    W0, b0 = initial_state
    z, W, b = FusedTTTLinearFunction.apply(eps, q, k, v, eta, token_eta, ln_weight, ln_bias, W0, b0)
    return z, (W, b)


def _ptrs(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers (None -> NULL)."""
    return (ctypes.c_void_p * len(tensors))(*(None if t is None else t.data_ptr() for t in tensors))


class FusedTTTMLPFunction(torch.autograd.Function):
    """forward(eps, q, k, v [B, T, H, D], eta [B, T, H], token_eta [b], ln_weight, ln_bias [H, D],
    W1 [B, H, D, F], b1 [B, H, F], W2 [B, H, F, D], b2 [B, H, D]) -> (z [B, T, H, D], W1', b1', W2', b2').

    As FusedTTTLinearFunction; saves each mini-batch's four starting state tensors."""

    @staticmethod
    def forward(ctx, eps, q, k, v, eta, token_eta, ln_weight, ln_bias, *state):
        B, T, H, D = q.shape
        F = state[0].shape[-1]
        q, k, v, eta = (_last_contiguous(t) for t in (q, k, v, eta))
        token_eta, ln_weight, ln_bias = (t.contiguous() for t in (token_eta, ln_weight, ln_bias))
        state = [s.contiguous() for s in state]
        check_inputs("TTT-MLP chain", q, k, v, eta, token_eta, ln_weight, ln_bias, *state)
        bs = token_eta.shape[0]
        N = -(-T // bs)
        z = q.new_empty(B, T, H, D)
        out = [q.new_empty(s.shape) for s in state]
        saved = [q.new_empty(B * H, N, *s.shape[2:]) for s in state]
        strides = torch.tensor([s for t in (q, k, v) for s in t.stride()[:3]] + list(eta.stride()), dtype=torch.int64)
        rc = kernel(SOURCE, "ttt_mlp_fwd", q.dtype)(
            ptr(q), ptr(k), ptr(v), ptr(eta), ptr(strides), ptr(token_eta), ptr(ln_weight), ptr(ln_bias),
            _ptrs(state), _ptrs(out), _ptrs(saved), ptr(z), _i64(B), _i64(H), _i64(T), _i64(D), _i64(F), _i64(bs),
            ctypes.c_double(eps), _int(torch.get_num_threads()))
        _check_rc(rc, "forward")
        ctx.eps = eps
        ctx.save_for_backward(q, k, v, eta, strides, token_eta, ln_weight, ln_bias, *saved)
        return (z, *out)

    @staticmethod
    @once_differentiable
    def backward(ctx, dz, *d_final):
        q, k, v, eta, strides, token_eta, ln_weight, ln_bias, *saved = ctx.saved_tensors
        B, T, H, D = q.shape
        F = saved[0].shape[-1]
        bs = token_eta.shape[0]
        dz = torch.zeros(B, T, H, D, dtype=q.dtype) if dz is None else dz.contiguous()
        d_final = [None if g is None else g.contiguous() for g in d_final]
        dq, dk, dv = (q.new_empty(B, T, H, D) for _ in range(3))
        deta = q.new_empty(B, T, H)
        dtok = q.new_empty(B * H, bs)
        dgamma, dbeta = q.new_empty(B, H, D), q.new_empty(B, H, D)
        d_state = [q.new_empty(B, H, *s.shape[2:]) for s in saved]
        rc = kernel(SOURCE, "ttt_mlp_bwd", q.dtype)(
            ptr(q), ptr(k), ptr(v), ptr(eta), ptr(strides), ptr(token_eta), ptr(ln_weight), ptr(ln_bias),
            _ptrs(saved), ptr(dz), _ptrs(d_final), ptr(dq), ptr(dk), ptr(dv), ptr(deta), ptr(dtok), ptr(dgamma),
            ptr(dbeta), _ptrs(d_state), _i64(B), _i64(H), _i64(T), _i64(D), _i64(F), _i64(bs),
            ctypes.c_double(ctx.eps), _int(torch.get_num_threads()))
        _check_rc(rc, "backward")
        return (None, dq, dk, dv, deta, dtok.sum(0), dgamma.sum(0), dbeta.sum(0), *d_state)


def fused_chunk_ttt_mlp(q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state, eps):
    """chunk_ttt_mlp's contract on validated CPU inputs of one dtype, float32 or float64."""
    z, *state = FusedTTTMLPFunction.apply(eps, q, k, v, eta, token_eta, ln_weight, ln_bias, *initial_state)
    return z, tuple(state)
