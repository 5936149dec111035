"""Mamba-1 selective scan as one fused C loop on CPU (`csrc/selective_scan.c`, built by kernels/native.py).

The plain-PyTorch scans in chunk.py pay ~3 us of dispatch per time step and several passes over the
[T, N, D] states; here a task (batch row, tile of 64 channels) keeps its state tile in L1 for the
whole sequence, so the scan costs its arithmetic: one exp2 and three multiply-adds per (t, d, n)
forward. Forward stores the state every K = 32 steps (not all T states: 1/32 of the memory);
backward recomputes each K-step block from its checkpoint and runs the adjoint through it (README.md
has the derivation; the C file the loop). Tasks run on `torch.get_num_threads()` OpenMP threads.

Same contract as `chunk_selective_scan`'s sequential path; `chunk_selective_scan` dispatches here for
CPU float32/float64 inputs when the library builds (`available()`), else runs chunk.py.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from titanforge.kernels.native import check_inputs, kernel, load, native_status, ptr

SOURCE = str(Path(__file__).with_name("csrc") / "selective_scan.c")
LOG2E = 1.4426950408889634
# Channels per task; equals TILE in csrc/selective_scan.c (the per-tile partial sums of dB, dC).
TILE = 64
# Checkpoint interval: K steps of a 64-channel tile at N = 16 is 2 x 128 KB of block buffers (L2).
# 16 to 32 measured fastest (T=1k, D=256, N=16); 4 or 64 were 10% slower in backward. The
# checkpoints take 1/K of the memory of all states.
CHECKPOINT_EVERY = 32

_i64, _int = ctypes.c_int64, ctypes.c_int


def available() -> bool:
    return load(SOURCE) is not None


def status() -> str:
    return native_status(SOURCE)


class FusedSelectiveScanFunction(torch.autograd.Function):
    """u, delta [B, T, D], A [D, N], B, C [B, T, N], D [D] or None, z [B, T, D] or None, h0 [B, D, N] or
    None -> out = (y + D u) * silu(z) [B, T, D] and h_T [B, D, N] (mamba_ssm's selective_scan_fn
    contract: the D skip and the SiLU gate ride in the loop). Saves the inputs and the checkpoints;
    writes nothing it saved (a retained graph can be backpropagated twice)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, h0):
        Bsz, T, Dn = u.shape
        N = A.shape[1]
        K = CHECKPOINT_EVERY
        check_inputs("selective scan", u, delta, A, B, C, D, z, h0)
        u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
        D = D.contiguous() if D is not None else None
        z = z.contiguous() if z is not None else None
        At = A.t().contiguous()  # [N, D]
        A2 = At * LOG2E
        h0t = h0.transpose(1, 2).contiguous() if h0 is not None else None  # [B, N, D]
        out = u.new_empty(Bsz, T, Dn)
        ck = u.new_empty(Bsz, (T + K - 1) // K, N, Dn)
        hT = u.new_empty(Bsz, N, Dn)
        kernel(SOURCE, "selective_scan_fwd", u.dtype)(
            ptr(u), ptr(delta), ptr(A2), ptr(B), ptr(C), ptr(D), ptr(z), ptr(h0t), ptr(out), ptr(ck), ptr(hT),
            _i64(Bsz), _i64(T), _i64(Dn), _i64(N), _i64(K), _int(torch.get_num_threads()))
        ctx.save_for_backward(u, delta, At, B, C, D, z, ck)
        ctx.has_h0, ctx.K = h0 is not None, K
        return out, hT.transpose(1, 2)

    @staticmethod
    def backward(ctx, gout, ghT):
        u, delta, At, B, C, D, z, ck = ctx.saved_tensors
        A2 = At * LOG2E
        Bsz, T, Dn = u.shape
        N = At.shape[0]
        ntiles = -(-Dn // TILE)
        gout = gout.contiguous()
        ghT = ghT.transpose(1, 2).contiguous()
        gu, gdelta = torch.empty_like(u), torch.empty_like(u)
        gA = u.new_empty(Bsz, N, Dn)
        gB, gC = (u.new_empty(ntiles, Bsz, T, N) for _ in range(2))
        gD = u.new_empty(Bsz, Dn)
        gz = torch.empty_like(u) if z is not None else None
        gh0 = u.new_empty(Bsz, N, Dn) if ctx.has_h0 else None
        kernel(SOURCE, "selective_scan_bwd", u.dtype)(
            ptr(u), ptr(delta), ptr(A2), ptr(At), ptr(B), ptr(C), ptr(D), ptr(z), ptr(ck), ptr(gout), ptr(ghT),
            ptr(gu), ptr(gdelta), ptr(gA), ptr(gB), ptr(gC), ptr(gD), ptr(gz), ptr(gh0),
            _i64(Bsz), _i64(T), _i64(Dn), _i64(N), _i64(ctx.K), _int(torch.get_num_threads()))
        return (gu, gdelta, gA.sum(0).t(), gB.sum(0), gC.sum(0), gD.sum(0) if D is not None else None, gz,
                gh0.transpose(1, 2) if gh0 is not None else None)


def fused_selective_scan(u, delta, A, B, C, D=None, z=None, initial_state=None):
    """out = (y + D u) * silu(z) [B, T, D] and the final state [B, D, N]; inputs as in chunk_selective_scan."""
    return FusedSelectiveScanFunction.apply(u, delta, A, B, C, D, z, initial_state)
