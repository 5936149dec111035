"""Dual-form TTT (kernels/ttt/chunk.py) against the primal per-token reference (naive.py).

Float64, odd lengths and lengths that are not a multiple of the mini-batch size b, outputs and
the gradients of every input (q, k, v, eta, token_eta, LN parameters, every initial-state
tensor), with a random cotangent on the final state too so its backward is exercised.
"""

import pytest
import torch

from testutil.kernel_util import rel_rms
from titanforge.kernels.ttt import chunk_ttt_linear, chunk_ttt_mlp, naive_ttt_linear, naive_ttt_mlp

OPS = {"linear": (chunk_ttt_linear, naive_ttt_linear), "mlp": (chunk_ttt_mlp, naive_ttt_mlp)}



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
    loss = (z * torch.randn(z.shape, generator=g, dtype=z.dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum() for s in final)
    loss.backward()
    grads = {k: v.grad for k, v in inputs.items()}
    grads.update({f"state{i}": s.grad for i, s in enumerate(state)})
    return z.detach(), tuple(s.detach() for s in final), grads


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("T,b", [(63, 16), (100, 16), (5, 16), (33, 11)])
def test_dual_matches_primal_fwd_bwd(inner, T, b):
    chunk, naive = OPS[inner]
    inputs, state = make_inputs(inner, T=T, b=b)
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
