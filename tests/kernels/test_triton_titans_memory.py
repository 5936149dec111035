"""The Titans memory chain forced to the Triton kernel (kernels/titans_memory/triton.py) against the
float64 token loop (naive.py), under the interpreter: outputs, final state (weights and momentum)
and the gradients of q, k, v, the three gates, the initial weights and the initial momentum; depth
1 and 2, odd widths (masked tiles), a ragged last chunk, a sequence shorter than a chunk, the
per-token clip with some tokens clipped, both reads, NaN-poisoned outputs. The kernel computes in
float32, so float32 leaves run it and float64 copies of the same values run the reference.
bf16: `gpu` marker."""

import pytest
import torch
import torch.nn.functional as F

from testutil.kernel_util import rel_rms
from titanforge.kernels import dispatch
from titanforge.kernels.titans_memory import chunk_titans_memory, naive_titans_memory


def make_inputs(B, T, H, Dk, Dv, widths, seed=1, device="cpu"):
    """float64 leaves of tests/kernels/test_titans_memory.py's kind: a carried initial state (weights
    per batch row and momentum), gates as sigmoids of data."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    dims = [Dk, *widths, Dv]
    leaves = dict(q=F.normalize(r(B, T, H, Dk), dim=-1), k=F.normalize(r(B, T, H, Dk), dim=-1), v=r(B, T, H, Dv),
                  theta=0.2 * torch.sigmoid(r(B, T, H)), eta=torch.sigmoid(r(B, T, H) + 1),
                  alpha=torch.sigmoid(r(B, T, H) - 2))
    leaves.update({f"w{i}": r(B, H, i_, o) / i_ ** 0.5 for i, (i_, o) in enumerate(zip(dims[:-1], dims[1:]))})
    leaves.update({f"m{i}": 0.1 * r(B, H, i_, o) for i, (i_, o) in enumerate(zip(dims[:-1], dims[1:]))})
    return {k: v.to(device) for k, v in leaves.items()}


def run_with_grads(fn, leaves, L, chunk, dtype, **kw):
    """(outputs [o, *W_final, *S_final], gradients of every leaf) under fixed random probes."""
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
    ws = [leaves[f"w{i}"] for i in range(L)]
    ms = [leaves[f"m{i}"] for i in range(L)]
    o, (W, S) = fn(*(leaves[n] for n in ("q", "k", "v", "theta", "eta", "alpha")), weights=ws, momentum=ms,
                   chunk_size=chunk, **kw)
    outs = [o, *W, *S]
    g = torch.Generator().manual_seed(7)
    probes = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype) for t in outs]
    grads = torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, outs)), list(leaves.values()))
    return [t.detach().double() for t in outs], {k: x.double() for k, x in zip(leaves, grads)}


CASES = [
    # (T, chunk, hidden widths (depth - 1 of them), activation, read, inner_grad_clip)
    (37, 8, [], "silu", "token", None),    # depth 1, ragged last chunk of 5
    (37, 8, [7], "silu", "token", None),   # depth 2, odd hidden width
    (19, 4, [5], "gelu", "chunk", None),   # the chunk-start read, gelu
    (3, 8, [7], "silu", "token", None),    # the whole sequence shorter than one chunk
    (29, 8, [7], "silu", "token", 2.8),    # clip: some tokens clipped, some not (asserted below)
    (21, 5, [], "silu", "token", 4.6),
]


@pytest.mark.parametrize("T,chunk,widths,act,read,clip", CASES)
def test_triton_chain_matches_naive(T, chunk, widths, act, read, clip, poisoned):
    B, H, Dk, Dv = 2, 2, 6, 5
    leaves = make_inputs(B, T, H, Dk, Dv, widths)
    L = len(widths) + 1
    kw = dict(activation=act, read=read, inner_grad_clip=clip)
    dispatch.counts.clear()
    outs, grads = run_with_grads(chunk_titans_memory, leaves, L, chunk, torch.float32, backend="triton", **kw)
    assert dispatch.counts["titans_memory", "triton"] == 1
    ref, grads_ref = run_with_grads(naive_titans_memory, leaves, L, chunk, torch.float64, **kw)
    if clip:  # the clip must change the result, i.e. clip some tokens
        off, _ = run_with_grads(naive_titans_memory, leaves, L, chunk, torch.float64, activation=act, read=read)
        assert rel_rms(off[0], ref[0]) > 1e-3
    for i, (a, b) in enumerate(zip(outs, ref)):
        assert rel_rms(a, b) < 1e-5, i
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads_ref[name].abs().max() > 0 and rel_rms(grads[name], grads_ref[name]) < 1e-5, name


@pytest.mark.parametrize("T,widths,clip", [(c[0], c[2], c[5]) for c in CASES if c[5]])
def test_clip_cases_clip_some_tokens_only(T, widths, clip):
    """Each clip level sits inside the spread of the per-token gradient norms at the initial weights
    (a proxy for the norms the chain sees), so both branches of the clip run."""
    leaves = make_inputs(2, T, 2, 6, 5, widths)
    W = [leaves[f"w{i}"].clone().requires_grad_() for i in range(len(widths) + 1)]
    norms = []
    for t in range(T):
        x = leaves["k"][:, t]
        for i, w in enumerate(W):
            x = torch.einsum("bhd,bhde->bhe", x, w)
            x = F.silu(x) if i < len(W) - 1 else x
        gs = torch.autograd.grad((x - leaves["v"][:, t]).pow(2).sum(), W)
        norms.append(sum(g.pow(2).sum((-1, -2)) for g in gs).sqrt())
    assert 0.2 < (torch.stack(norms) > clip).double().mean() < 0.8


def test_dispatch_refuses_what_does_not_fit():
    leaves = {k: v.float() for k, v in make_inputs(1, 6, 1, 4, 4, [3, 3]).items()}
    args = [leaves[n] for n in ("q", "k", "v", "theta", "eta", "alpha")]
    ws = [leaves[f"w{i}"] for i in range(3)]
    with pytest.raises(ValueError, match="depth <= 2"):
        chunk_titans_memory(*args, weights=ws, chunk_size=4, backend="triton")
    one = make_inputs(1, 6, 1, 4, 4, [])
    with pytest.raises(ValueError, match="float32"):  # float64 stays off the float32 kernel
        chunk_titans_memory(*(one[n] for n in ("q", "k", "v", "theta", "eta", "alpha")), weights=[one["w0"]],
                            chunk_size=4, backend="triton")
    big = {k: v.float() for k, v in make_inputs(1, 4, 1, 130, 4, []).items()}
    with pytest.raises(ValueError, match="width"):
        chunk_titans_memory(*(big[n] for n in ("q", "k", "v", "theta", "eta", "alpha")), weights=[big["w0"]],
                            chunk_size=4, backend="triton")
    dispatch.counts.clear()
    chunk_titans_memory(*args, weights=ws, chunk_size=4, backend="torch")
    assert dispatch.counts["titans_memory", "torch"] == 1


@pytest.mark.gpu
def test_titans_memory_bf16_on_gpu():
    leaves = make_inputs(2, 512, 4, 64, 64, [64], device="cuda")
    names = ("q", "k", "v", "theta", "eta", "alpha")
    ws = [leaves[f"w{i}"] for i in range(2)]
    ms = [leaves[f"m{i}"] for i in range(2)]
    o, (W, _) = chunk_titans_memory(*(leaves[n].bfloat16() for n in names), weights=[w.float() for w in ws],
                                    momentum=[m.float() for m in ms], chunk_size=16, backend="triton")
    o_ref, (W_ref, _) = chunk_titans_memory(*(leaves[n] for n in names), weights=ws, momentum=ms, chunk_size=16,
                                            backend="torch")
    assert o.dtype == torch.bfloat16
    assert rel_rms(o.double(), o_ref) < 3e-2 and rel_rms(W[0].double(), W_ref[0]) < 3e-2


def test_chain_compiles_without_graph_breaks():
    """The kernels are torch.library ops with fake kernels and autograd: a fullgraph compile traces
    through them (aot_eager: inductor's graph capture without code generation), same gradients."""
    leaves = {k: v.float().requires_grad_() for k, v in make_inputs(1, 10, 2, 4, 3, [5]).items()}

    def f(q, k, v, theta, eta, alpha, w0, w1, m0, m1):
        o, (W, S) = chunk_titans_memory(q, k, v, theta, eta, alpha, weights=[w0, w1], momentum=[m0, m1],
                                        chunk_size=4, inner_grad_clip=1.0, backend="triton")
        return o.sum() + W[0].sum() + S[1].sum()

    args = list(leaves.values())
    want = torch.autograd.grad(f(*args), args)
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(*args), args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
