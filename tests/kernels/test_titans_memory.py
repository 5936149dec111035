"""chunk_titans_memory against the token loop of naive.py (float64): outputs, final state, and the
gradients with respect to q, k, v, the three gates, the initial weights and the initial momentum.
Both chunk chains are checked: the fused C loop (backend "native", fused_cpu.py) and PyTorch's."""

import pytest
import torch
import torch.nn.functional as F

from testutil.kernel_util import on_threads, rel_rms
from titanforge.kernels.titans_memory import fused_cpu
from titanforge.kernels.titans_memory import chunk_titans_memory, naive_titans_memory, titans_memory_retrieve
from titanforge.kernels.titans_memory.naive import mlp_forward



def make_inputs(B, T, H, Dk, Dv, widths, dtype=torch.float64, batched_state=False, momentum=False):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q, k = F.normalize(r(B, T, H, Dk), dim=-1), F.normalize(r(B, T, H, Dk), dim=-1)
    v = r(B, T, H, Dv)
    # Gates as a model makes them: sigmoids of data, theta kept small so a deep memory stays stable.
    theta = 0.2 * torch.sigmoid(r(B, T, H))
    eta = torch.sigmoid(r(B, T, H) + 1)
    alpha = torch.sigmoid(r(B, T, H) - 2)
    dims = [Dk, *widths, Dv]
    lead = (B, H) if batched_state else (H,)
    weights = [r(*lead, i, o) / i ** 0.5 for i, o in zip(dims[:-1], dims[1:])]
    mom = [0.1 * r(B, H, i, o) for i, o in zip(dims[:-1], dims[1:])] if momentum else None
    leaves = dict(q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha)
    leaves.update({f"w{i}": w for i, w in enumerate(weights)})
    if mom:
        leaves.update({f"m{i}": m for i, m in enumerate(mom)})
    for t in leaves.values():
        t.requires_grad_(True)
    return leaves, weights, mom


def run(fn, leaves, weights, mom, chunk_size, activation="silu", **kw):
    return fn(leaves["q"], leaves["k"], leaves["v"], leaves["theta"], leaves["eta"], leaves["alpha"],
              weights=weights, momentum=mom, chunk_size=chunk_size, activation=activation, **kw)


BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not fused_cpu.available(), reason=f"C chunk chain unavailable: {fused_cpu.status()}"))]


def flat(o, state):
    W, S = state
    return [o, *W, *S]


CASES = [
    # (T, chunk_size, hidden widths (L_M - 1 of them), batched initial state, initial momentum, activation)
    (63, 1, [6], False, False, "silu"),
    (63, 8, [6], True, True, "silu"),
    (100, 16, [], False, True, "silu"),
    (37, 5, [7, 4], True, False, "gelu"),
    (30, 64, [6], False, False, "silu"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,chunk,widths,batched,mom,act", CASES)
def test_chunk_matches_naive_forward_and_grads(T, chunk, widths, batched, mom, act, backend, poisoned):
    B, H, Dk, Dv = 2, 3, 5, 4
    leaves, weights, momentum = make_inputs(B, T, H, Dk, Dv, widths, batched_state=batched, momentum=mom)
    out_c = flat(*run(chunk_titans_memory, leaves, weights, momentum, chunk, act, backend=backend))
    out_n = flat(*run(naive_titans_memory, leaves, weights, momentum, chunk, act))
    for a, b in zip(out_c, out_n):
        assert a.shape == b.shape
        assert rel_rms(a, b) < 1e-10
    # A random linear functional of every output reaches every input through both paths.
    g = torch.Generator().manual_seed(2)
    probes = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in out_n]
    names = list(leaves)
    grads_c = torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, out_c)), list(leaves.values()))
    grads_n = torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, out_n)), list(leaves.values()))
    for name, a, b in zip(names, grads_c, grads_n):
        assert b.abs().max() > 0, name
        assert rel_rms(a, b) < 1e-9, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,chunk,widths,act", [(45, 8, [6], "silu"), (23, 5, [], "gelu")])
def test_chunk_start_read_option_matches_naive(T, chunk, widths, act, backend, poisoned):
    """read="chunk" (every token reads its chunk's starting weights, the cheaper option) in both
    chains against the token loop reading the same: outputs, final state, every gradient."""
    leaves, weights, momentum = make_inputs(2, T, 3, 5, 4, widths, momentum=True)
    out_c = flat(*run(chunk_titans_memory, leaves, weights, momentum, chunk, act, backend=backend, read="chunk"))
    out_n = flat(*run(naive_titans_memory, leaves, weights, momentum, chunk, act, read="chunk"))
    out_t = run(naive_titans_memory, leaves, weights, momentum, chunk, act)[0]
    assert rel_rms(out_t, out_n[0]) > 1e-3  # the two reads differ
    for a, b in zip(out_c, out_n):
        assert rel_rms(a, b) < 1e-10
    g = torch.Generator().manual_seed(6)
    probes = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in out_n]
    grads_c = torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, out_c)), list(leaves.values()))
    grads_n = torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, out_n)), list(leaves.values()))
    for name, a, b in zip(leaves, grads_c, grads_n):
        assert rel_rms(a, b) < 1e-9, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("widths", [[], [6]])
def test_token_read_sees_the_earlier_tokens_of_its_chunk(widths, backend):
    """Issue 15: with chunk-start reads, changing token 1 left the outputs at positions 2..b-1 of
    its chunk exactly unchanged (a token learnt nothing from its own chunk). Per-token reads: every
    later position of the chunk changes, no earlier one does (causal); the chunk read stays blind."""
    b = 16
    leaves, weights, momentum = make_inputs(1, 2 * b, 2, 5, 4, widths, momentum=True)
    leaves = {n: t.detach() for n, t in leaves.items()}
    changed = {n: t.clone() for n, t in leaves.items()}
    changed["k"][:, 1] = F.normalize(torch.randn_like(changed["k"][:, 1]), dim=-1)
    changed["v"][:, 1] += 1.0
    for read in ("token", "chunk"):
        o, _ = run(chunk_titans_memory, leaves, weights, momentum, b, backend=backend, read=read)
        o2, _ = run(chunk_titans_memory, changed, weights, momentum, b, backend=backend, read=read)
        diff = (o2 - o).abs().amax((0, 2, 3))  # per position
        assert diff[:1].max() == 0  # causal
        if read == "token":
            assert diff[1:b].min() > 1e-4, diff
        else:
            assert diff[1:b].max() == 0
        assert diff[b:].min() > 1e-4  # the next chunk sees it through the state, either way


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,chunk,widths,act,clip,Dk,Dv", [
    (41, 8, [6], "silu", 2.0, 5, 4), (29, 1, [], "silu", 3.5, 5, 4), (37, 5, [7, 4], "gelu", 2.5, 5, 4),
    # widths past one float64 vector (8) with scalar tails: the C chain's vector norms and dot products
    (45, 16, [37], "silu", 6.8, 19, 17)])
def test_inner_grad_clip_matches_naive(T, chunk, widths, act, clip, Dk, Dv, backend, poisoned):
    """The per-token clip of the inner gradient (all layers' norm, per batch row and head) in
    both chains against the token loop, where autograd differentiates through the norm: outputs,
    final state and every gradient; clip levels at which some tokens are clipped and some not."""
    B, H = 2, 3
    leaves, weights, momentum = make_inputs(B, T, H, Dk, Dv, widths, batched_state=True, momentum=True)
    norms = _grad_norms(leaves, weights, act)  # the test must exercise both branches of the clip
    assert 0.2 < (norms > clip).double().mean() < 0.8
    out_c = flat(*run(chunk_titans_memory, leaves, weights, momentum, chunk, act, backend=backend,
                      inner_grad_clip=clip))
    out_n = flat(*run(naive_titans_memory, leaves, weights, momentum, chunk, act, inner_grad_clip=clip))
    out_off = flat(*run(naive_titans_memory, leaves, weights, momentum, chunk, act))
    assert rel_rms(out_off[0], out_n[0]) > 1e-3  # the clip changes the result
    for a, b in zip(out_c, out_n):
        assert rel_rms(a, b) < 1e-10
    g = torch.Generator().manual_seed(5)
    probes = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in out_n]
    grads_c = torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, out_c)), list(leaves.values()))
    grads_n = torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, out_n)), list(leaves.values()))
    for name, a, b in zip(leaves, grads_c, grads_n):
        assert b.abs().max() > 0 and rel_rms(a, b) < 1e-9, name


def _grad_norms(leaves, weights, act):
    """|grad l(M_0; x_t)| at the initial weights, per token [T, B, H] (a proxy for the norms the chain sees)."""
    k, v = leaves["k"].detach(), leaves["v"].detach()
    W = [w.detach().requires_grad_(True) for w in weights]
    pred = mlp_forward(W, k.transpose(1, 2), act)
    norms = []
    for t in range(k.shape[1]):
        gs = torch.autograd.grad((pred[:, :, t] - v[:, t]).pow(2).sum(), W, retain_graph=True)
        norms.append(sum(x.pow(2).sum((-1, -2)) for x in gs).sqrt())
    return torch.stack(norms)


@pytest.mark.skipif(not fused_cpu.available(), reason=f"C chunk chain unavailable: {fused_cpu.status()}")
@pytest.mark.parametrize("Dk,hidden,T,chunk", [(32, 64, 48, 16), (48, 80, 45, 16), (19, 37, 21, 6)])
def test_native_chain_on_vector_tiles_matches_naive(Dk, hidden, T, chunk, poisoned):
    """Widths that fill the C loop's register blocks and 16 x 16 transpose tiles (32, 64), that
    fill single vectors only (48, 80), and that leave scalar edges (19, 37), in float64 against the
    token loop, and in float32 against the float64 result; outputs and every gradient."""
    leaves, weights, mom = make_inputs(2, T, 2, Dk, Dk, [hidden], momentum=True)
    names = list(leaves)
    g = torch.Generator().manual_seed(3)
    out_n = flat(*run(naive_titans_memory, leaves, weights, mom, chunk))
    probes = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in out_n]
    grads_n = torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, out_n)), list(leaves.values()))
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
        lv = {n: t.detach().to(dtype).requires_grad_(True) for n, t in leaves.items()}
        ws = [lv[f"w{i}"] for i in range(len(weights))]
        ms = [lv[f"m{i}"] for i in range(len(mom))]
        out_c = flat(*run(chunk_titans_memory, lv, ws, ms, chunk, backend="native"))
        for a, b in zip(out_c, out_n):
            assert a.dtype == dtype and rel_rms(a.double(), b) < tol
        grads_c = torch.autograd.grad(sum((p.to(dtype) * t).sum() for p, t in zip(probes, out_c)), list(lv.values()))
        for name, a, b in zip(names, grads_c, grads_n):
            assert rel_rms(a.double(), b) < tol, (dtype, name)


@pytest.mark.skipif(not fused_cpu.available(), reason=f"C chunk chain unavailable: {fused_cpu.status()}")
def test_native_chain_threads_identical_and_graph_reusable():
    """Tasks (batch x head rows) are independent, so 1 and 2 threads give bit-identical results; the
    backward writes nothing it saved, so a retained graph backpropagates twice to the same grads."""
    leaves, weights, mom = make_inputs(2, 40, 3, 16, 16, [32], dtype=torch.float32, momentum=True)

    def once():
        o, (W, S) = run(chunk_titans_memory, leaves, weights, mom, 8, backend="native")
        loss = o.square().sum() + sum(w.sum() for w in W + S)
        return [o.detach(), *torch.autograd.grad(loss, list(leaves.values()))]
    a, b = on_threads(once)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    o, (W, _) = run(chunk_titans_memory, leaves, weights, mom, 8, backend="native")
    loss = o.square().sum() + W[0].sum()
    g1 = torch.autograd.grad(loss, list(leaves.values()), retain_graph=True)
    g2 = torch.autograd.grad(loss, list(leaves.values()))
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))


@pytest.mark.skipif(not fused_cpu.available(), reason=f"C chunk chain unavailable: {fused_cpu.status()}")
def test_native_chain_reads_strided_inputs_in_place():
    """The C chain reads q, k, v and the gates through their strides (the model hands it head
    slices of one [B, T, 3H, D] tensor, and gates sliced from one projection): same result, bit
    for bit, as from contiguous copies, and the gradients land in the strided inputs' shapes."""
    leaves, weights, mom = make_inputs(2, 29, 3, 8, 8, [12], momentum=True)
    names = ["q", "k", "v", "theta", "eta", "alpha"]
    qkv = torch.cat([leaves[n] for n in names[:3]], 2).detach().requires_grad_(True)  # [B, T, 3H, D]
    gates = torch.stack([leaves[n] for n in names[3:]], -1).detach().requires_grad_(True)  # [B, T, H, 3]
    views = [*qkv.split(3, 2), *gates.unbind(-1)]
    assert not any(v.is_contiguous() for v in views)
    copies = [v.detach().contiguous().requires_grad_(True) for v in views]
    outs = []
    for inp in (views, copies):
        o, (W, S) = chunk_titans_memory(*inp, weights=weights, momentum=mom, chunk_size=8, backend="native")
        outs.append([o, *W, *S])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    loss = lambda out: out[0].square().sum() + sum(w.sum() for w in out[1:])  # noqa: E731
    g_view = torch.autograd.grad(loss(outs[0]), [qkv, gates])
    g_copy = torch.autograd.grad(loss(outs[1]), copies)
    assert torch.equal(g_view[0], torch.cat(g_copy[:3], 2))
    assert torch.equal(g_view[1], torch.stack(g_copy[3:], -1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Tr", [7, 40])
def test_read_after_the_chain_matches_reading_the_final_state(backend, Tr, poisoned):
    """read_after = q' returns M_final(q') beside o and the state (MAC's retrieval for the next
    segment, fused into the chain's call): equal to the token loop's final weights applied to q',
    for outputs and for every gradient, q' included (float64; q' a strided view, and longer than
    2b rows so the C loop reads it in several blocks)."""
    leaves, weights, mom = make_inputs(2, 37, 3, 5, 4, [6], momentum=True)
    g = torch.Generator().manual_seed(4)
    qr = F.normalize(torch.randn(2, Tr, 6, 5, generator=g, dtype=torch.float64), dim=-1)[:, :, ::2]
    qr.requires_grad_(True)
    o, (W, S), read = run(chunk_titans_memory, leaves, weights, mom, 8, backend=backend, read_after=qr)
    o_n, (W_n, S_n) = run(naive_titans_memory, leaves, weights, mom, 8)
    read_n = mlp_forward(W_n, qr.transpose(1, 2)).transpose(1, 2)
    out, ref = [o, read, *W, *S], [o_n, read_n, *W_n, *S_n]
    for a, b in zip(out, ref):
        assert rel_rms(a, b) < 1e-10
    probes = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in ref]
    inputs = [*leaves.values(), qr]
    got = torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, out)), inputs)
    want = torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, ref)), inputs)
    for name, a, b in zip([*leaves, "read_after"], got, want):
        assert b.abs().max() > 0 and rel_rms(a, b) < 1e-9, name


def test_native_chain_is_used_where_a_compiler_exists():
    """auto picks the C loop on CPU wherever it builds: a broken build cannot hide behind the fallback."""
    import shutil
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert fused_cpu.status() == "native"
    leaves, weights, _ = make_inputs(1, 8, 1, 4, 4, [4])
    o, _ = run(chunk_titans_memory, leaves, weights, None, 4)
    assert any(type(f).__name__ == "FusedChunkMemoryFunctionBackward" for f in _walk(o.grad_fn))


def _walk(fn, seen=None):
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return
    seen.add(fn)
    yield fn
    for nxt, _ in fn.next_functions:
        yield from _walk(nxt, seen)


def test_float32_matches_float64_reference():
    leaves, weights, _ = make_inputs(2, 63, 3, 8, 8, [16])
    o64, _ = run(naive_titans_memory, leaves, weights, None, 16)
    l32 = {n: t.detach().float() for n, t in leaves.items()}
    o32, (W32, _) = run(chunk_titans_memory, l32, [w.detach().float() for w in weights], None, 16)
    assert o32.dtype == torch.float32 and W32[0].dtype == torch.float32
    assert rel_rms(o32.double(), o64) < 1e-5


@pytest.mark.parametrize("T,chunk,split", [(63, 8, 24), (100, 1, 37), (70, 10, 40)])
def test_two_pieces_with_carried_state_equal_one_pass(T, chunk, split):
    leaves, weights, mom = make_inputs(2, T, 3, 5, 4, [6], momentum=True)
    o, (W, S) = run(chunk_titans_memory, leaves, weights, mom, chunk)
    first = {n: (t[:, :split] if t.dim() >= 3 and t.shape[1] == T else t) for n, t in leaves.items()}
    second = {n: (t[:, split:] if t.dim() >= 3 and t.shape[1] == T else t) for n, t in leaves.items()}
    o1, state1 = run(chunk_titans_memory, first, weights, mom, chunk)
    o2, (W2, S2) = run(chunk_titans_memory, second, state1[0], state1[1], chunk)
    assert rel_rms(torch.cat([o1, o2], 1), o) < 1e-12
    for a, b in zip(W2 + S2, W + S):
        assert rel_rms(a, b) < 1e-12
    # Gradients flow through the carried state into the first piece's inputs.
    g1 = torch.autograd.grad(o2.sum(), leaves["k"])[0]
    assert g1[:, :split].abs().max() > 0


def test_retrieve_equals_mlp_forward():
    leaves, weights, _ = make_inputs(2, 30, 3, 5, 4, [6], batched_state=True)
    y = titans_memory_retrieve(leaves["q"], weights)
    ref = mlp_forward(weights, leaves["q"].transpose(1, 2)).transpose(1, 2)
    assert rel_rms(y, ref) < 1e-14


def test_bad_inputs_raise_clear_errors():
    leaves, weights, _ = make_inputs(2, 10, 3, 5, 4, [6])
    q, k, v, th, et, al = (leaves[n] for n in ("q", "k", "v", "theta", "eta", "alpha"))
    with pytest.raises(ValueError, match="theta"):
        chunk_titans_memory(q, k, v, th[:, :, :1], et, al, weights=weights)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_titans_memory(q, k, v, th, et, al, weights=weights, chunk_size=0)
    with pytest.raises(ValueError, match="d_out"):
        chunk_titans_memory(q, k, v, th, et, al, weights=weights[:1])
    with pytest.raises(ValueError, match="activation"):
        chunk_titans_memory(q, k, v, th, et, al, weights=weights, activation="tanh")
    with pytest.raises(ValueError, match="momentum"):
        chunk_titans_memory(q, k, v, th, et, al, weights=weights, momentum=[torch.zeros(1)] * 2)


def test_compile_flag_routes_the_chain_through_torch_compile(monkeypatch):
    """compile=True hands the chain's forward and backward to torch.compile (CI does not compile:
    torch.compile is replaced by a recorder that returns the function unchanged), and the routed
    path gives bit-identical outputs and gradients (the same functions run)."""
    from titanforge.kernels.titans_memory import chunk as chunk_mod
    compiled = []

    def fake_compile(fn, **kw):
        compiled.append((fn.__name__, kw))
        return fn

    monkeypatch.setattr(chunk_mod, "_COMPILED", [])
    monkeypatch.setattr(chunk_mod.torch, "compile", fake_compile)
    leaves, weights, mom = make_inputs(2, 37, 3, 5, 4, [6], momentum=True)
    names = list(leaves)
    results = []
    for flag in (False, True):
        o, (W, S) = chunk_titans_memory(leaves["q"], leaves["k"], leaves["v"], leaves["theta"], leaves["eta"],
                                        leaves["alpha"], weights=weights, momentum=mom, chunk_size=8, compile=flag,
                                        backend="torch")
        grads = torch.autograd.grad(o.square().sum() + sum(w.sum() for w in W + S), [leaves[n] for n in names])
        results.append([o, *W, *S, *grads])
    assert [name for name, _ in compiled] == ["_chain_forward", "_chain_backward"]
    for a, b in zip(*results):
        assert torch.equal(a, b)
