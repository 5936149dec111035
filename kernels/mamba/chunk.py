"""Chunked scans for the Mamba mixers in plain PyTorch, fast on CPU.

Mamba-1 (`chunk_selective_scan`, Gu & Dao 2023, arXiv 2312.00752): the decay Ā_t = exp(Δ_t A) is
per channel AND per state (A is [D, N]), so there is no matmul form (Mamba-2 has one because its
decay is a scalar per head). The recurrence h_t = Ā_t ⊙ h_{t-1} + x_t is an elementwise linear
scan. On CPU its cost is the number of passes over the [B, T, N, D] states (and fresh buffers of
that size, which cost page faults), not the flops, so:

- states are laid out [B, T, N, D] inside (the public A is [D, N], states [B, D, N]): with D
  contiguous, the reductions over N (y_t = C_t h_t, Σ_n B g, Σ_n A q) are one bmm or a
  vectorised plane sum, where the [.., D, N] layout made them several times slower;
- the default (chunk_size 0) is ONE chunk: a loop over T, each step one in-place multiply-add on a
  whole [B, N, D] plane (views made once by unbind). About 4 µs of overhead per step, cheaper than
  the two extra passes chunking needs below, unless B·N·D is tiny;
- chunk_size L > 0 runs a two-level scan: (1) within chunks, a loop over the L positions
  vectorised over all T/L chunks (state from zero); (2) a loop over the T/L chunk boundaries on
  [B, N, D] carries the state; (3) h_t += (Π_{s<=t in chunk} Ā_s) ⊙ carry_c. Only products of
  decays in (0, 1] appear: unlike the "cumulative log-decay" factorisation exp(S_t) exp(-S_s)
  (fine for Mamba-2's scalar per-head decay), nothing can overflow however large Δ A gets.

The backward is the same scan run backwards in time (README.md has the derivation), written by
hand in an autograd.Function that keeps u, Δ, B, C, the states h and the decays Ā. It allocates
one [B, T, N, D] buffer and reuses the saved decays as scratch (so a retained graph cannot be
backpropagated twice: the saved-tensor version check raises).

Mamba-2 (`chunk_ssd`): the chunked SSD of Dao & Gu 2024 (arXiv 2405.21060), the
`ssd_minimal_discrete` listing of mamba_ssm, with padding to a whole number of chunks, B/C groups
and an initial state; autograd differentiates it.

Axis glossary: B batch, T time, D inner channels, N state size, L chunk length, H heads, P head
dim, G groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


class SelectiveScanFunction(torch.autograd.Function):
    """Inputs in the public layout (A [D, N], h0 [B, D, N]); states run as [.., N, D] inside, so
    the channel axis D is the contiguous one and reductions over N vectorise."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk_size):
        # chunk_size 0: one chunk, i.e. a plain sequential scan over T.
        L = u.shape[1] if chunk_size == 0 else max(1, min(chunk_size, u.shape[1]))
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
                         chunk_size: int = 0):
    """Mamba-1 selective scan, chunked (see module docstring).

    chunk_size 0 (default) runs one chunk: a sequential loop over T, each step one whole
    [B, N, D] plane; that is the fastest on CPU unless B·D·N is tiny, since chunking adds two
    passes (the chunk-entry decays P and the carry correction) over [B, T, N, D].

    u, delta: [B, T, D] (delta after softplus), A: [D, N] (negative), B, C: [B, T, N], D: [D],
    initial_state: [B, D, N]. Returns y [B, T, D] and the final state [B, D, N] (None unless
    `output_final_state`). Computes in the dtype of u; pass float32 or float64.
    """
    if u.dim() != 3:
        raise ValueError(f"u must be [B, T, D], got shape {tuple(u.shape)}")
    if chunk_size < 0:
        raise ValueError(f"chunk_size={chunk_size} must be >= 0 (0 = the whole sequence as one chunk)")
    Bsz, T, Dn = u.shape
    N = A.shape[-1]
    _check("delta", delta, (Bsz, T, Dn))
    _check("A", A, (Dn, N))
    _check("B", B, (Bsz, T, N))
    _check("C", C, (Bsz, T, N))
    if D is not None:
        _check("D", D, (Dn,))
    if initial_state is not None:
        _check("initial_state", initial_state, (Bsz, Dn, N))
        initial_state = initial_state.to(u.dtype)
    y, h_last = SelectiveScanFunction.apply(u, delta, A.to(u.dtype), B, C, initial_state, chunk_size)
    if D is not None:
        y = y + u * D
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
              output_final_state: bool = False, chunk_size: int = 64):
    """Mamba-2 SSD, chunked (ssd_minimal_discrete with padding, groups, initial state).

    x: [B, T, H, P], dt: [B, T, H] (after softplus), A: [H] (negative), B, C: [B, T, G, N] with
    H % G == 0, D: [H], initial_state: [B, H, P, N]. Returns y [B, T, H, P] and the final state
    [B, H, P, N] (None unless `output_final_state`).
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
