"""The Triton TTT-Linear and TTT-MLP dual forms (kernels/ttt/triton.py) against the primal float64
reference: output, final state and the gradients of every input (q, k, v, eta, token_eta, the LN
parameters, every initial-state tensor), under the interpreter; odd head and hidden dims (masked
tiles), a ragged last mini-batch, NaN-poisoned outputs. The kernels compute in float32 whatever the storage dtype, so
float64 storage lets the reference and the kernel see the same random probes. bf16: `gpu` marker."""

import pytest
import torch

from testutil.kernel_util import rel_rms
from titanforge.kernels.ttt import chunk_ttt_linear, chunk_ttt_mlp, naive_ttt_linear, naive_ttt_mlp
from titanforge.kernels.ttt.triton import ttt_linear_triton, ttt_mlp_triton


def make_inputs(B, T, H, D, b, dtype=torch.float64, seed=0, mlp=False):
    """Inputs of tests/kernels/test_ttt.py's kind: LN near identity, token_eta 1/(i+1) perturbed."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype)

    inputs = dict(q=rnd(B, T, H, D), k=rnd(B, T, H, D), v=rnd(B, T, H, D),
                  eta=(torch.rand(B, T, H, generator=g, dtype=torch.float64) * 0.3).to(dtype),
                  token_eta=(1.0 / torch.arange(1, b + 1) + 0.05 * torch.rand(b, generator=g)).to(dtype),
                  ln_weight=rnd(H, D, scale=0.1, shift=1.0), ln_bias=rnd(H, D, scale=0.1))
    if mlp:  # F = 4D - 1: not a power of two, so the hidden tiles are masked too
        Fh = 4 * D - 1
        return inputs, (rnd(B, H, D, Fh, scale=0.3), rnd(B, H, Fh, scale=0.1), rnd(B, H, Fh, D, scale=0.3),
                        rnd(B, H, D, scale=0.1))
    return inputs, (rnd(B, H, D, D, scale=0.3), rnd(B, H, D, scale=0.1))


def run_with_grads(op, inputs, state, seed=1):
    inputs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    state = tuple(s.clone().requires_grad_() for s in state)
    z, final = op(**inputs, initial_state=state)
    g = torch.Generator().manual_seed(seed)
    loss = (z * torch.randn(z.shape, generator=g, dtype=z.dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum() for s in final)
    leaves = [*inputs.values(), *state]
    grads = torch.autograd.grad(loss, leaves)
    return z.detach(), tuple(s.detach() for s in final), dict(zip([*inputs, *(f"state{i}" for i in range(4))], grads))


@pytest.mark.parametrize("inner,T,b,D", [("linear", 19, 8, 5), ("linear", 16, 4, 6), ("linear", 3, 4, 4),
                                         ("mlp", 19, 8, 5), ("mlp", 6, 4, 4)])
def test_ttt_triton_matches_primal(inner, T, b, D, poisoned):
    inputs, state = make_inputs(B=2, T=T, H=2, D=D, b=b, mlp=inner == "mlp")
    kernel, naive = (ttt_linear_triton, naive_ttt_linear) if inner == "linear" else (ttt_mlp_triton, naive_ttt_mlp)
    z, final, grads = run_with_grads(kernel, inputs, state)
    z_ref, final_ref, grads_ref = run_with_grads(naive, inputs, state)
    assert rel_rms(z, z_ref) < 1e-6
    for a, c in zip(final, final_ref):
        assert rel_rms(a, c) < 1e-5
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert rel_rms(grads[name], grads_ref[name]) < 1e-5, name


def test_dispatch_runs_the_kernel_in_float32_and_refuses_what_does_not_fit():
    inputs, state = make_inputs(B=1, T=10, H=2, D=4, b=4, dtype=torch.float32)
    z, final = chunk_ttt_linear(**inputs, initial_state=state, backend="triton")
    z_ref, final_ref = chunk_ttt_linear(**inputs, initial_state=state, backend="torch")
    assert rel_rms(z, z_ref) < 1e-5 and rel_rms(final[0], final_ref[0]) < 1e-5
    odd, odd_state = make_inputs(B=1, T=10, H=2, D=4, b=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="power-of-two mini-batch"):
        chunk_ttt_linear(**odd, initial_state=odd_state, backend="triton")
    inputs, state = make_inputs(B=1, T=10, H=2, D=4, b=4, dtype=torch.float32, mlp=True)
    z, final = chunk_ttt_mlp(**inputs, initial_state=state, backend="triton")
    z_ref, final_ref = chunk_ttt_mlp(**inputs, initial_state=state, backend="torch")
    assert rel_rms(z, z_ref) < 1e-5 and all(rel_rms(a, b) < 1e-5 for a, b in zip(final, final_ref))


@pytest.mark.gpu
def test_ttt_bf16_on_gpu():
    inputs, state = make_inputs(B=2, T=512, H=4, D=64, b=16)
    cuda = {k: v.cuda() for k, v in inputs.items()}
    z, _ = chunk_ttt_linear(**{k: (v.bfloat16() if k in "qkv" else v.float()) for k, v in cuda.items()},
                            initial_state=tuple(s.float().cuda() for s in state), backend="triton")
    z_ref, _ = naive_ttt_linear(**cuda, initial_state=tuple(s.cuda() for s in state))
    assert rel_rms(z, z_ref) < 2e-2
    inputs, state = make_inputs(B=2, T=256, H=4, D=64, b=16, mlp=True)
    cuda = {k: v.cuda() for k, v in inputs.items()}
    z, _ = chunk_ttt_mlp(**{k: (v.bfloat16() if k in "qkv" else v.float()) for k, v in cuda.items()},
                         initial_state=tuple(s.float().cuda() for s in state), backend="triton")
    z_ref, _ = naive_ttt_mlp(**cuda, initial_state=tuple(s.cuda() for s in state))
    assert rel_rms(z, z_ref) < 2e-2
