"""Chunked scans for the Mamba mixers in plain PyTorch.

On CPU (float32/float64) `chunk_selective_scan` hands its sequential case to the fused C loop in
`fused_cpu.py`, several times faster; the PyTorch scans below are the fallback (no C compiler,
CUDA, torch.compile) and the chunked variant.

Mamba-1 (`chunk_selective_scan`, Gu & Dao 2023, arXiv 2312.00752): the decay Ā_t = exp(Δ_t A) is
per channel AND per state (A is [D, N]), so there is no matmul form (Mamba-2 has one because its
decay is a scalar per head). The recurrence h_t = Ā_t ⊙ h_{t-1} + x_t is an elementwise linear
scan. On CPU its cost is the number of passes over the [B, T, N, D] states that reach main memory
(16 MB per pass at T=1k, D=256, N=16), not the flops, so:

- the default (chunk_size 0) is a sequential scan run in time blocks of ~2^18 state elements
  (`_block_len`: 64 steps at B=1, N=16, D=256, about 1 MB). Each block does all its passes (decays,
  inputs, the loop over its steps, the read-out) while they sit in cache, so the full-size states
  are written once (forward) and read a few times (backward) instead of every pass streaming them.
  The loop steps are one in-place multiply-add on a whole [B, N, D] plane (~3 µs each); states
  are laid out [T, B, N, D] inside (time outermost, so a block is contiguous; D contiguous, so the
  reductions over N vectorise). The decays are not kept: backward recomputes them per block (one
  multiply and an exp2, cheaper than writing and re-reading them), and exp2(Δ·A·log2 e) replaces
  exp(Δ·A) since it is 2.5x faster on CPU;
- chunk_size L > 0 runs a two-level scan: (1) within chunks, a loop over the L positions
  vectorised over all T/L chunks (state from zero); (2) a loop over the T/L chunk boundaries on
  [B, N, D] carries the state; (3) h_t += (Π_{s<=t in chunk} Ā_s) ⊙ carry_c. Only products of
  decays in (0, 1] appear: unlike the "cumulative log-decay" factorisation exp(S_t) exp(-S_s)
  (fine for Mamba-2's scalar per-head decay), nothing can overflow however large Δ A gets. It
  keeps the states [B, T, N, D] and the decays and reuses the saved decays as scratch in backward
  (so a retained graph cannot be backpropagated twice there: the saved-tensor version check raises).

Both backwards are the same scan run backwards in time (README.md has the derivation), written by
hand in an autograd.Function.

Mamba-2 (`chunk_ssd`): the chunked SSD of Dao & Gu 2024 (arXiv 2405.21060), the
`ssd_minimal_discrete` listing of mamba_ssm, with padding to a whole number of chunks, B/C groups
and an initial state; autograd differentiates it.

Axis glossary: B batch, T time, D inner channels, N state size, L chunk length, H heads, P head
dim, G groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titanforge.kernels.dispatch import BACKENDS, pick
from titanforge.kernels.mamba import fused_cpu


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) by `pad`; Δ = 0 there means decay 1 and no input: the state is kept."""
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t


def _chunks(t: torch.Tensor, L: int) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1] // L, L, *t.shape[2:])


def _chunk_scan_(h: torch.Tensor, a: torch.Tensor, P: torch.Tensor | None, h0: torch.Tensor | None,
                 reverse: bool = False) -> torch.Tensor:
    """In place on h [B, nc, L, N, D] (holding the inputs x): h_l = a_l ⊙ h_{l-1} + x_l along the
    flattened time axis (nc, L), or backwards in time with `reverse` (h_l = a_l ⊙ h_{l+1} + x_l).

    P [B, nc, L, N, D] is the decay from the chunk's entry to each position (Π of a over the chunk
    up to and including l, in the scan's direction); it is only read when nc > 1. h0 [B, N, D] is
    the state before the first step. Returns the state after the last step (a new tensor).
    """
    nc, L = h.shape[1], h.shape[2]
    first, last = (L - 1, 0) if reverse else (0, L - 1)
    # unbind: L views made at once; indexing h[:, :, l] per step costs several times more.
    hs, as_ = h.unbind(2), a.unbind(2)  # L x [B, nc, N, D]
    if nc == 1 and h0 is not None:
        # One chunk: seed the first step with the initial state, no carry pass needed.
        hs[first].addcmul_(as_[first], h0.unsqueeze(1))
    # 1. Within every chunk at once (from a zero state unless seeded): L steps on [B, nc, N, D].
    for l in (range(L - 2, -1, -1) if reverse else range(1, L)):
        hs[l].addcmul_(as_[l], hs[l + 1 if reverse else l - 1])
    if nc == 1:
        return hs[last][:, 0].clone()
    # 2. Across chunk boundaries: nc steps on [B, N, D].
    carry = h0 if h0 is not None else h.new_zeros(hs[0][:, 0].shape)
    carries = torch.empty_like(hs[0])
    for c in (range(nc - 1, -1, -1) if reverse else range(nc)):
        carries[:, c] = carry
        carry = torch.addcmul(hs[last][:, c], P[:, c, last], carry)
    # 3. The carried state's decayed contribution, all positions at once.
    h.addcmul_(P, carries.unsqueeze(2))
    return carry


def selective_scan_fwd(u, delta, At, B, C, h0, L):
    """At = Aᵀ [N, D], h0 [B, N, D] or None. Returns y [B, T, D], the padded states
    h [B, nc, L, N, D], the decays a_ext [B, nc*L + 1, N, D] (a_ext[:, t] = Ā_t, a_ext[:, -1] = 1;
    both kept for backward) and h_{T-1} [B, N, D]."""
    Bsz, T, Dn = u.shape
    N = At.shape[0]
    pad = (-T) % L
    u, delta, B, C = (_chunks(_pad_time(t, pad), L) for t in (u, delta, B, C))
    nc = u.shape[1]
    # One extra step of decay 1 at the end, so backward reads Ā_{t+1} as a view (no shifted copy).
    a_ext = u.new_empty(Bsz, nc * L + 1, N, Dn)
    a_ext[:, -1] = 1
    a = _chunks(a_ext[:, :-1], L)
    torch.mul(delta[..., None, :], At, out=a).exp_()  # Ā = exp(Δ A), [B, nc, L, N, D]
    # exp(A Σ_{s<=l} Δ_s): decay from each chunk's start; only values <= 1 appear.
    P = (delta.cumsum(2)[..., None, :] * At).exp_() if nc > 1 else None
    h = torch.mul((delta * u)[..., None, :], B[..., None])  # x_t = Δ_t u_t B_t
    h_last = _chunk_scan_(h, a, P, h0)
    del P
    y = torch.matmul(C[..., None, :], h).squeeze(-2)  # y_t = C_t h_t, [B, nc, L, D]
    return y.view(Bsz, -1, Dn)[:, :T], h, a_ext, h_last


def selective_scan_bwd(gy, gh_last, u, delta, At, B, C, h0, h, a_ext, L):
    """Adjoint of `selective_scan_fwd` (README.md): g_t = dL/dh_t runs the scan backwards,
    g_t = gy_t C_t + Ā_{t+1} g_{t+1}, then every input gradient is a local product with g_t.
    Reductions over N run across the [N, D] planes (vectorised along D), those over D along rows."""
    Bsz, T, Dn = u.shape
    N = At.shape[0]
    pad = (-T) % L
    gy, u, delta, B, C = (_chunks(_pad_time(t, pad), L) for t in (gy, u, delta, B, C))
    nc = u.shape[1]
    a = _chunks(a_ext[:, :-1], L)
    a_next = _chunks(a_ext[:, 1:], L)  # stepping back from t+1 to t applies Ā_{t+1}
    P = None
    if nc > 1:
        dnext = _chunks(F.pad(delta.reshape(Bsz, nc * L, Dn)[:, 1:], (0, 0, 0, 1)), L)
        P = (dnext.flip(2).cumsum(2).flip(2)[..., None, :] * At).exp_()  # Π_{j >= l} Ā_{j+1} in the chunk
    g = torch.mul(gy[..., None, :], C[..., None])  # direct dL/dh_t = C_t gy_tᵀ, [B, nc, L, N, D]
    _chunk_scan_(g, a_next, P, gh_last, reverse=True)
    del P
    gh0 = a[:, 0, 0] * g[:, 0, 0]

    # One [B, T, N, D] buffer is allocated here (g); the rest reuse the saved decays and g itself,
    # since on CPU fresh large buffers cost page faults on top of the passes. Overwriting the saved
    # decays makes a second backward through this graph fail the saved-tensor version check.
    # q = dL/d(Δ A) = g_t ⊙ h_{t-1} ⊙ Ā_t (h_{-1} = h0), built in place over Ā.
    q = a.mul_(g)
    gv = torch.matmul(B[..., None, :], g).squeeze(-2)  # dL/d(Δ u) = Σ_n B_n g_n, [B, nc, L, D]
    gB = g.mul_((delta * u)[..., None, :]).sum(-1)  # Σ_d g Δ u, [B, nc, L, N]
    gC = torch.mul(h, gy[..., None, :], out=g).sum(-1)  # Σ_d gy h, [B, nc, L, N]
    flat = lambda t: t.view(Bsz, nc * L, N, Dn)  # noqa: E731
    flat(q)[:, 1:].mul_(flat(h)[:, :-1])
    if h0 is not None:
        q[:, 0, 0].mul_(h0)
    else:
        q[:, 0, 0] = 0
    gdelta = torch.mul(q, At, out=g).sum(-2).addcmul_(gv, u)
    gu = gv.mul_(delta)
    gA = q.mul_(delta[..., None, :]).sum((0, 1, 2))  # [N, D]
    unpad = lambda t: t.reshape(Bsz, nc * L, *t.shape[3:])[:, :T]  # noqa: E731
    return unpad(gu), unpad(gdelta), gA, unpad(gB), unpad(gC), gh0


LOG2E = 1.4426950408889634


def _block_len(T: int, plane: int) -> int:
    """Time steps per block of the sequential scan: ~2^18 state elements (1 MB in float32), which
    measured fastest on a 2-core EPYC (64 to 128 steps at B=1, N=16, D=256 were equal)."""
    return max(1, min(T, (1 << 18) // max(plane, 1)))


def sequential_scan_fwd(u, delta, At2, B, C, h0, L):
    """Time-major inputs u, delta [T, B, D], B, C [T, B, N], At2 = Aᵀ·log2(e) [N, D], h0 [B, N, D] or
    None. Returns y [T, B, D], the states h [T, B, N, D] (kept for backward) and h_{T-1}."""
    T, Bsz, Dn = u.shape
    N = At2.shape[0]
    h = u.new_empty(T, Bsz, N, Dn)
    a = u.new_empty(L, Bsz, N, Dn)  # one block of decays, reused
    du = delta * u
    y = u.new_empty(T, Bsz, Dn)
    hs = h.unbind(0)  # T views made at once; indexing h[t] per step costs several times more
    carry = h0
    for s in range(0, T, L):
        e = min(T, s + L)
        a_b, h_b = a[:e - s], h[s:e]
        torch.mul(delta[s:e, :, None, :], At2, out=a_b).exp2_()  # Ā = exp(Δ A)
        torch.mul(du[s:e, :, None, :], B[s:e, :, :, None], out=h_b)  # x_t = Δ_t u_t B_t
        as_ = a_b.unbind(0)
        if carry is not None:
            hs[s].addcmul_(as_[0], carry)
        for t in range(s + 1, e):
            hs[t].addcmul_(as_[t - s], hs[t - 1])
        carry = hs[e - 1]
        torch.matmul(C[s:e, :, None, :], h_b, out=y[s:e, :, None, :])  # y_t = C_t h_t
    return y, h, hs[T - 1].clone()


def sequential_scan_bwd(gy, gh_last, u, delta, At, B, C, h0, h, L):
    """Adjoint of `sequential_scan_fwd`, block by block from the end: the decays Ā_s..Ā_e of a block
    are recomputed, g_t = gy_t C_t + Ā_{t+1} g_{t+1} runs backwards through it (carried into the
    block before), then every input gradient is a product with g_t while the block is in cache."""
    T, Bsz, Dn = u.shape
    N = At.shape[0]
    At2 = At * LOG2E
    du = delta * u
    g_buf, tmp_buf, a_buf = (u.new_empty(L + 1, Bsz, N, Dn) for _ in range(3))
    gu, gdelta = torch.empty_like(u), torch.empty_like(u)
    gB, gC = torch.empty_like(B), torch.empty_like(C)
    gA = torch.zeros_like(At)
    hs = h.unbind(0)
    carry = gh_last
    for s in reversed(range(0, T, L)):
        e = min(T, s + L)
        n = e - s
        # Ā_s .. Ā_e: stepping back from t+1 to t applies Ā_{t+1}; past the end it is 1.
        m = min(e + 1, T) - s
        a_b = a_buf[:n + 1]
        torch.mul(delta[s:s + m, :, None, :], At2, out=a_b[:m]).exp2_()
        if m == n:
            a_b[n] = 1
        as_ = a_b.unbind(0)
        g_b = g_buf[:n]
        torch.mul(gy[s:e, :, None, :], C[s:e, :, :, None], out=g_b)  # direct dL/dh_t = C_t gy_tᵀ
        gs = g_b.unbind(0)
        if carry is not None:
            gs[n - 1].addcmul_(as_[n], carry)
        for t in range(n - 2, -1, -1):
            gs[t].addcmul_(as_[t + 1], gs[t + 1])
        carry = gs[0].clone()
        tmp = tmp_buf[:n]
        torch.sum(torch.mul(h[s:e], gy[s:e, :, None, :], out=tmp), -1, out=gC[s:e])  # Σ_d gy h
        torch.sum(torch.mul(g_b, du[s:e, :, None, :], out=tmp), -1, out=gB[s:e])  # Σ_d g Δ u
        gv = torch.matmul(B[s:e, :, None, :], g_b).squeeze(-2)  # dL/d(Δ u) = Σ_n B_n g_n, [n, B, D]
        # q = dL/d(Δ A) = g_t ⊙ h_{t-1} ⊙ Ā_t (h_{-1} = h0), built over the block's decays.
        q = a_b[:n].mul_(g_b)
        if n > 1:
            q[1:].mul_(h[s:e - 1])
        if s > 0:
            q[0].mul_(hs[s - 1])
        elif h0 is not None:
            q[0].mul_(h0)
        else:
            q[0].zero_()
        torch.sum(torch.mul(q, At, out=tmp), -2, out=gdelta[s:e]).addcmul_(gv, u[s:e])
        torch.mul(gv, delta[s:e], out=gu[s:e])
        gA += q.mul_(delta[s:e, :, None, :]).sum((0, 1))
    gh0 = torch.mul(delta[0, :, None, :], At2).exp2_().mul_(carry) if h0 is not None else None
    return gu, gdelta, gA, gB, gC, gh0


class SequentialScanFunction(torch.autograd.Function):
    """Inputs in the public layout (u [B, T, D], A [D, N], h0 [B, D, N]); inside, time-major
    [T, B, ...] with states [T, B, N, D]. Saves u, Δ, B, C, h0 and the states h (not the decays),
    and writes nothing it saved, so a retained graph can be backpropagated again."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        tm = lambda t: t.transpose(0, 1).contiguous()  # noqa: E731  (a view when B == 1)
        u, delta, B, C = tm(u), tm(delta), tm(B), tm(C)
        At = A.t().contiguous()
        h0t = h0.transpose(1, 2).contiguous() if h0 is not None else None
        L = _block_len(u.shape[0], u.shape[1] * At.numel())
        y, h, h_last = sequential_scan_fwd(u, delta, At * LOG2E, B, C, h0t, L)
        ctx.save_for_backward(u, delta, At, B, C, h0t, h)
        ctx.L = L
        return y.transpose(0, 1), h_last.transpose(1, 2)

    @staticmethod
    def backward(ctx, gy, gh_last):
        u, delta, At, B, C, h0t, h = ctx.saved_tensors
        gh_last = gh_last.transpose(1, 2).contiguous() if gh_last is not None else None
        gu, gdelta, gA, gB, gC, gh0 = sequential_scan_bwd(gy.transpose(0, 1).contiguous(), gh_last, u, delta,
                                                          At, B, C, h0t, h, ctx.L)
        tm = lambda t: t.transpose(0, 1)  # noqa: E731
        return tm(gu), tm(gdelta), gA.t(), tm(gB), tm(gC), (gh0.transpose(1, 2) if h0t is not None else None)


class SelectiveScanFunction(torch.autograd.Function):
    """Inputs in the public layout (A [D, N], h0 [B, D, N]); states run as [.., N, D] inside, so
    the channel axis D is the contiguous one and reductions over N vectorise."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk_size):
        L = max(1, min(chunk_size, u.shape[1]))
        At = A.t().contiguous()
        h0t = h0.transpose(1, 2).contiguous() if h0 is not None else None
        y, h, a_ext, h_last = selective_scan_fwd(u, delta, At, B, C, h0t, L)
        ctx.save_for_backward(u, delta, At, B, C, h0t, h, a_ext)
        ctx.L = L
        return y, h_last.transpose(1, 2)

    @staticmethod
    def backward(ctx, gy, gh_last):
        u, delta, At, B, C, h0t, h, a_ext = ctx.saved_tensors
        gh_last = gh_last.transpose(1, 2).contiguous() if gh_last is not None else None
        gu, gdelta, gA, gB, gC, gh0 = selective_scan_bwd(gy.contiguous(), gh_last, u, delta, At, B, C,
                                                          h0t, h, a_ext, ctx.L)
        return (gu, gdelta, gA.t(), gB, gC, (gh0.transpose(1, 2) if h0t is not None else None), None)


def _check(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def chunk_selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         C: torch.Tensor, D: torch.Tensor | None = None,
                         initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                         chunk_size: int = 0, backend: str = "auto", z: torch.Tensor | None = None):
    """Mamba-1 selective scan, chunked (see module docstring).

    chunk_size 0 (default) runs the sequential scan: with backend "auto" (default) on CPU float32/
    float64 tensors, as one fused C loop (`fused_cpu.py`, ~4x faster than PyTorch; falls back when
    no C compiler is found), otherwise ("torch", or CUDA, or under torch.compile) in cache-sized
    time blocks of PyTorch ops: a loop over T, each step one whole [B, N, D] plane; that is the
    fastest plain-PyTorch form on CPU unless B·D·N is tiny, since chunking adds two passes (the
    chunk-entry decays P and the carry correction) over [B, T, N, D]. backend "native" requires
    the C loop (raises if it cannot be built).

    u, delta: [B, T, D] (delta after softplus), A: [D, N] (negative), B, C: [B, T, N], D: [D],
    z: [B, T, D] (the gate), initial_state: [B, D, N]. Returns (y + D u) * silu(z) [B, T, D] (without
    the skip or the gate where D or z is None; mamba_ssm's selective_scan_fn contract; the C loop
    applies both in place) and the final state [B, D, N] (None unless `output_final_state`).
    Computes in the dtype of u; pass float32 or float64. On CUDA ("auto") or with backend "triton" the
    Triton kernels of triton.py run instead (any chunk_size; float32 arithmetic in any storage dtype).
    """
    if u.dim() != 3:
        raise ValueError(f"u must be [B, T, D], got shape {tuple(u.shape)}")
    if chunk_size < 0:
        raise ValueError(f"chunk_size={chunk_size} must be >= 0 (0 = the whole sequence as one chunk)")
    if backend not in BACKENDS:
        raise ValueError(f"chunk_selective_scan: backend={backend!r}: expected one of {list(BACKENDS)}")
    Bsz, T, Dn = u.shape
    N = A.shape[-1]
    _check("delta", delta, (Bsz, T, Dn))
    _check("A", A, (Dn, N))
    _check("B", B, (Bsz, T, N))
    _check("C", C, (Bsz, T, N))
    if D is not None:
        _check("D", D, (Dn,))
    if z is not None:
        _check("z", z, (Bsz, T, Dn))
    if initial_state is not None:
        _check("initial_state", initial_state, (Bsz, Dn, N))
        initial_state = initial_state.to(u.dtype)
    path = pick("selective_scan", backend, u, delta, A, B, C, D, z, initial_state,
                native_source=fused_cpu.SOURCE if chunk_size == 0 else None)
    if path == "triton":
        from titanforge.kernels.mamba.triton import selective_scan_triton

        y, h_last = selective_scan_triton(u, delta, A, B, C, D, z, initial_state)
        return y, (h_last.to(u.dtype) if output_final_state else None)
    if chunk_size == 0 and path == "native":
        cast = lambda t: None if t is None else t.to(u.dtype)  # noqa: E731
        y, h_last = fused_cpu.FusedSelectiveScanFunction.apply(u, *map(cast, (delta, A, B, C, D, z)), initial_state)
        return y, (h_last if output_final_state else None)
    elif chunk_size == 0:
        y, h_last = SequentialScanFunction.apply(u, delta, A.to(u.dtype), B, C, initial_state)
    else:
        y, h_last = SelectiveScanFunction.apply(u, delta, A.to(u.dtype), B, C, initial_state, chunk_size)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y, (h_last if output_final_state else None)


def segsum(x: torch.Tensor) -> torch.Tensor:
    """x [..., L] -> [..., L, L] with out[i, j] = sum_{j < s <= i} x_s (i >= j), -inf above the diagonal.

    Built by a masked cumulative sum rather than a difference of cumsums, which is exact (ssd_minimal).
    """
    L = x.shape[-1]
    x = x[..., None].expand(*x.shape, L)  # [..., L(i), L(j)] holding x_i
    strict = torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strict, 0)
    out = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~lower, float("-inf"))


def chunk_ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
              output_final_state: bool = False, chunk_size: int = 64, backend: str = "auto"):
    """Mamba-2 SSD, chunked (ssd_minimal_discrete with padding, groups, initial state).

    x: [B, T, H, P], dt: [B, T, H] (after softplus), A: [H] (negative), B, C: [B, T, G, N] with
    H % G == 0, D: [H], initial_state: [B, H, P, N]. Returns y [B, T, H, P] and the final state
    [B, H, P, N] (None unless `output_final_state`). backend (kernels/dispatch.py): on CUDA ("auto")
    or with "triton" the Triton kernels of triton.py (power-of-two chunk_size >= 16, P <= 128);
    elsewhere this PyTorch form.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, P], got shape {tuple(x.shape)}")
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[-1]
    if H % G:
        raise ValueError(f"heads H={H} must be divisible by the B/C groups G={G}")
    _check("dt", dt, (Bsz, T, H))
    _check("A", A, (H,))
    _check("B", B, (Bsz, T, G, N))
    _check("C", C, (Bsz, T, G, N))
    if initial_state is not None:
        _check("initial_state", initial_state, (Bsz, H, P, N))
    if pick("ssd", backend, x, dt, A, B, C, D, initial_state) == "triton":
        from titanforge.kernels.mamba import triton as mamba_triton

        if mamba_triton.ssd_fits(x, chunk_size):
            y, h_last = mamba_triton.ssd_triton(x, dt, A, B, C, D, initial_state, chunk_size)
            return y, (h_last.to(x.dtype) if output_final_state else None)
        if backend == "triton":
            raise ValueError(f"chunk_ssd: backend='triton' needs a power-of-two chunk_size (>= 16 on a GPU) and "
                             f"head dim <= 128; got {chunk_size} and {P} (use backend='auto')")
    L = max(1, min(chunk_size, T))
    pad = (-T) % L
    X = x * dt[..., None]
    Adt = dt * A  # log-decay per step, [B, T, H]
    Bh, Ch = B.repeat_interleave(H // G, dim=2), C.repeat_interleave(H // G, dim=2)
    if pad:
        # Zero input and zero log-decay (decay 1) leave the state unchanged past T.
        X, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, Bh, Ch))
        Adt = F.pad(Adt, (0, 0, 0, pad))
    nc = X.shape[1] // L
    X, Bh, Ch = (t.reshape(Bsz, nc, L, H, -1) for t in (X, Bh, Ch))
    Adt = Adt.reshape(Bsz, nc, L, H).permute(0, 3, 1, 2)  # [B, H, nc, L]
    A_cum = torch.cumsum(Adt, dim=-1)

    # Intra-chunk (diagonal blocks): y_l = sum_{s<=l} C_l·B_s exp(sum_{s<r<=l} Adt_r) X_s.
    Lmat = torch.exp(segsum(Adt))  # [B, H, nc, L, L]
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, Lmat, X)
    # State each chunk contributes at its end.
    decay_states = torch.exp(A_cum[..., -1:] - A_cum)  # [B, H, nc, L]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_states, X)
    # Inter-chunk recurrence over chunk boundaries.
    h0 = initial_state.to(X.dtype) if initial_state is not None else torch.zeros_like(states[:, 0])
    states = torch.cat([h0[:, None], states], dim=1)  # [B, nc+1, H, P, N]
    decay_chunk = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # [B, H, nc+1, nc+1]
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # State -> output within each chunk.
    Y_off = torch.einsum("bclhn,bhcl,bchpn->bclhp", Ch, torch.exp(A_cum), states)
    y = (Y_diag + Y_off).reshape(Bsz, nc * L, H, P)[:, :T]
    if D is not None:
        y = y + x * D[:, None]
    return y, (final_state if output_final_state else None)
