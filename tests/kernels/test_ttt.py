"""Dual-form TTT against the primal per-token reference (naive.py): the PyTorch dual form
(kernels/ttt/chunk.py, backend "torch") and the fused C loop (fused_cpu.py, backend "native").

Float64, odd lengths and lengths that are not a multiple of the mini-batch size b, outputs and
the gradients of every input (q, k, v, eta, token_eta, LN parameters, every initial-state
tensor), with a random cotangent on the final state too so its backward is exercised; the C loop
also in float32, on head sizes that fill its vector tiles, on strided inputs and two threads.
"""

from functools import partial

import pytest
import torch

from testutil.kernel_util import on_threads, rel_rms
from titanforge.kernels.ttt import chunk_ttt_linear, chunk_ttt_mlp, fused_cpu, naive_ttt_linear, naive_ttt_mlp

OPS = {"linear": (partial(chunk_ttt_linear, backend="torch"), naive_ttt_linear),
       "mlp": (partial(chunk_ttt_mlp, backend="torch"), naive_ttt_mlp)}
NATIVE = {"linear": partial(chunk_ttt_linear, backend="native"), "mlp": partial(chunk_ttt_mlp, backend="native")}
needs_native = pytest.mark.skipif(not fused_cpu.available(), reason=f"C TTT chain unavailable: {fused_cpu.status()}")
PATHS = [(inner, "torch") for inner in OPS] + [pytest.param(inner, "native", marks=needs_native) for inner in OPS]



def make_inputs(inner: str, B=2, T=63, H=3, D=6, b=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    inputs = dict(
        q=rnd(B, T, H, D), k=rnd(B, T, H, D), v=rnd(B, T, H, D),
        eta=(torch.rand(B, T, H, generator=g, dtype=torch.float64) * 0.3).to(dtype),
        # 1/(i+1) plus a perturbation, like the official learnable per-position factor.
        token_eta=(1.0 / torch.arange(1, b + 1, dtype=torch.float64)
                   + 0.05 * torch.rand(b, generator=g, dtype=torch.float64)).to(dtype),
        ln_weight=rnd(H, D, scale=0.1, shift=1.0), ln_bias=rnd(H, D, scale=0.1),
    )
    if inner == "linear":
        state = (rnd(B, H, D, D, scale=0.3), rnd(B, H, D, scale=0.1))
    else:
        Fh = 4 * D - 1  # not a multiple of D, so a transposed layout would fail
        state = (rnd(B, H, D, Fh, scale=0.3), rnd(B, H, Fh, scale=0.1),
                 rnd(B, H, Fh, D, scale=0.3), rnd(B, H, D, scale=0.1))
    return inputs, state


def run_with_grads(op, inputs, state, seed=1):
    inputs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    state = tuple(s.clone().requires_grad_() for s in state)
    z, final = op(**inputs, initial_state=state)
    g = torch.Generator().manual_seed(seed)
    # Cotangents drawn in float64 whatever the dtype, so float32 runs see the same ones.
    loss = (z * torch.randn(z.shape, generator=g, dtype=torch.float64).to(z.dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)).sum() for s in final)
    loss.backward()
    grads = {k: v.grad for k, v in inputs.items()}
    grads.update({f"state{i}": s.grad for i, s in enumerate(state)})
    return z.detach(), tuple(s.detach() for s in final), grads


@pytest.mark.parametrize("inner,backend", PATHS)
@pytest.mark.parametrize("B,T,b", [(2, 63, 16), (2, 100, 16), (2, 5, 16), (2, 33, 11), (1, 37, 1)])
def test_dual_matches_primal_fwd_bwd(inner, backend, B, T, b, poisoned):
    chunk, naive = OPS[inner]
    chunk = NATIVE[inner] if backend == "native" else chunk
    inputs, state = make_inputs(inner, B=B, T=T, b=b)
    z, final, grads = run_with_grads(chunk, inputs, state)
    z_ref, final_ref, grads_ref = run_with_grads(naive, inputs, state)
    assert rel_rms(z, z_ref) < 1e-10
    for s, s_ref in zip(final, final_ref):
        assert rel_rms(s, s_ref) < 1e-10
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name] is not None and grads_ref[name] is not None, name
        assert rel_rms(grads[name], grads_ref[name]) < 1e-9, name


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_float32_close_to_float64_reference(inner):
    chunk, naive = OPS[inner]
    inputs, state = make_inputs(inner, T=40, b=16)
    z32, _ = chunk(**{k: v.float() for k, v in inputs.items()}, initial_state=tuple(s.float() for s in state))
    z64, _ = naive(**inputs, initial_state=state)
    assert z32.dtype == torch.float32
    assert rel_rms(z32.double(), z64) < 1e-5


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_pieces_at_minibatch_multiples_equal_one_pass(inner):
    chunk, _ = OPS[inner]
    inputs, state = make_inputs(inner, T=71, b=16)
    z, final = chunk(**inputs, initial_state=state)
    cut = 32
    first = {k: v[:, :cut] if v.dim() >= 3 else v for k, v in inputs.items()}
    second = {k: v[:, cut:] if v.dim() >= 3 else v for k, v in inputs.items()}
    z1, mid = chunk(**first, initial_state=state)
    z2, final2 = chunk(**second, initial_state=mid)
    assert rel_rms(torch.cat([z1, z2], 1), z) < 1e-12
    for s, s2 in zip(final, final2):
        assert rel_rms(s2, s) < 1e-12


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_pieces_elsewhere_close_a_minibatch_early(inner):
    # A boundary inside a mini-batch ends that mini-batch there (documented in chunk.py): the
    # result agrees with the primal reference run on the same pieces, not with one pass.
    chunk, naive = OPS[inner]
    inputs, state = make_inputs(inner, T=45, b=16)
    cut = 20
    pieces = [{k: v[:, sl] if v.dim() >= 3 else v for k, v in inputs.items()}
              for sl in (slice(0, cut), slice(cut, None))]
    outs = {}
    for name, op in (("chunk", chunk), ("naive", naive)):
        z1, mid = op(**pieces[0], initial_state=state)
        z2, _ = op(**pieces[1], initial_state=mid)
        outs[name] = torch.cat([z1, z2], 1).detach()
    assert rel_rms(outs["chunk"], outs["naive"]) < 1e-10
    z_one, _ = chunk(**inputs, initial_state=state)
    assert torch.allclose(outs["chunk"][:, :cut], z_one[:, :cut], rtol=0, atol=1e-12)
    assert rel_rms(outs["chunk"][:, cut:32], z_one[:, cut:32]) > 1e-6


def test_bad_shapes_raise_clear_errors():
    inputs, state = make_inputs("linear", T=10, b=4)
    with pytest.raises(ValueError, match="eta must be"):
        chunk_ttt_linear(**{**inputs, "eta": inputs["eta"][..., 0]}, initial_state=state)
    with pytest.raises(ValueError, match="initial_state must have shapes"):
        chunk_ttt_linear(**inputs, initial_state=state[:1])
    with pytest.raises(ValueError, match="token_eta"):
        chunk_ttt_mlp(**{**inputs, "token_eta": inputs["token_eta"][:0]}, initial_state=state)
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        chunk_ttt_linear(**{**inputs, "k": inputs["k"][:, :3]}, initial_state=state)


@needs_native
@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("dtype,D,T", [(torch.float64, 37, 45), (torch.float32, 70, 40), (torch.float32, 16, 19)])
def test_native_on_vector_tiles_matches_primal(inner, dtype, D, T, poisoned):
    """Head sizes that fill the C loop's vector tiles (16 float32 / 8 float64 lanes, blocks of 4
    vectors) plus a ragged tail; float32 against the float64 reference, outputs and all gradients."""
    inputs, state = make_inputs(inner, B=2, T=T, H=2, D=D, b=16)
    # keep the products at unit scale: weights over sqrt(fan-in)
    state = tuple(s / s.shape[-2] ** 0.5 if s.dim() == 4 else s for s in state)
    cast = lambda t: t.to(dtype)  # noqa: E731
    z, final, grads = run_with_grads(NATIVE[inner], {k: cast(v) for k, v in inputs.items()}, tuple(map(cast, state)))
    z_ref, final_ref, grads_ref = run_with_grads(OPS[inner][1], inputs, state)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert z.dtype == dtype and rel_rms(z.double(), z_ref) < tol
    for s, s_ref in zip(final, final_ref):
        assert rel_rms(s.double(), s_ref) < tol
    for name in grads_ref:
        assert grads_ref[name].abs().max() > 0 and rel_rms(grads[name].double(), grads_ref[name]) < 20 * tol, name


@needs_native
@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_native_threads_identical_graph_reusable_and_strided_inputs(inner):
    """Tasks (batch x head rows) are independent, so 1 and 2 threads give bit-identical results;
    the backward writes nothing it saved, so a retained graph backpropagates twice to the same
    grads; q, k, v sliced from one [B, T, 3H, D] projection (as the model could hand them) are
    read through their strides with the same result as contiguous copies."""
    inputs, state = make_inputs(inner, B=2, T=50, H=3, D=20, b=16, dtype=torch.float32)
    qkv = torch.cat([inputs["q"], inputs["k"], inputs["v"]], 2).requires_grad_()
    leaves = [qkv, *(inputs[n].requires_grad_() for n in ("eta", "token_eta", "ln_weight", "ln_bias")),
              *(s.requires_grad_() for s in state)]

    def once():
        q, k, v = qkv.split(3, 2)
        assert not q.is_contiguous()
        z, (W, *rest) = NATIVE[inner](q, k, v, *leaves[1:5], initial_state=tuple(leaves[5:]))
        loss = z.square().sum() + W.sum() + rest[-1].square().sum()
        return [z.detach(), W.detach(), *torch.autograd.grad(loss, leaves)]
    one, two = on_threads(once)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    z_copy, (W_copy, *_) = NATIVE[inner](*(inputs[n].contiguous() for n in ("q", "k", "v")),
                                 *leaves[1:5], initial_state=tuple(leaves[5:]))
    assert torch.equal(z_copy, one[0]) and torch.equal(W_copy, one[1])
    q, k, v = qkv.split(3, 2)
    z, (W, *_) = NATIVE[inner](q, k, v, *leaves[1:5], initial_state=tuple(leaves[5:]))
    loss = z.square().sum() + W.sum()
    g1 = torch.autograd.grad(loss, leaves, retain_graph=True)
    g2 = torch.autograd.grad(loss, leaves)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_native_chain_is_used_where_a_compiler_exists():
    """auto picks the C loop for CPU float32/float64 wherever it builds: a broken build cannot
    hide behind the PyTorch fallback."""
    import shutil
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert fused_cpu.status() == "native"
    for inner, op, fn in (("linear", chunk_ttt_linear, "FusedTTTLinearFunctionBackward"),
                          ("mlp", chunk_ttt_mlp, "FusedTTTMLPFunctionBackward")):
        inputs, state = make_inputs(inner, B=1, T=8, H=1, D=4, b=4)
        z, _ = op(**{k: v.requires_grad_() for k, v in inputs.items()}, initial_state=state)
        assert type(z.grad_fn).__name__ == fn
        z, _ = op(**inputs, initial_state=state, backend="torch")
        assert type(z.grad_fn).__name__ != fn
