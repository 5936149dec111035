"""The Titans memory stays finite and bounded for any gates and inputs once its inner gradient is
clipped per token (`inner_grad_clip`, kernels/titans_memory/README.md), and diverges without.

Adversarial drive: every key (and query) nearly the same unit vector, so the T gradients pile up
in one direction; values large and random, so the memory can never fit them; the step theta
large, the momentum decay eta next to 1 and the forgetting alpha next to 0 (the gates' limits
under their sigmoids). The clip bounds each token's gradient by tau, so by construction
|S_t| <= theta tau sum_j eta^j and |M_t| <= |M_0| + sum_{s<=t} |S_s| (alpha >= 0): the test checks
these bounds, not only finiteness.
"""

import pytest
import torch
import torch.nn.functional as F

from titanforge.kernels.titans_memory import chunk_titans_memory, fused_cpu

BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not fused_cpu.available(), reason=f"C chunk chain unavailable: {fused_cpu.status()}"))]


def adversarial(T, H, D, widths, eta, theta=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    k0 = F.normalize(torch.randn(1, 1, H, D, generator=g), dim=-1)
    k = F.normalize(k0 + 0.01 * torch.randn(1, T, H, D, generator=g), dim=-1)
    v = 3 * torch.randn(1, T, H, D, generator=g)
    full = lambda x: torch.full((1, T, H), x)  # noqa: E731
    # eta = sigmoid(14) = 1 - 8e-7, alpha = sigmoid(-16) = 1e-7 when eta is None: the gates' limits
    gates = (full(theta), full(eta if eta is not None else torch.sigmoid(torch.tensor(14.0)).item()),
             full(torch.sigmoid(torch.tensor(-16.0)).item()))
    dims = [D, *widths, D]
    weights = [torch.randn(H, i, o, generator=g) / i ** 0.5 for i, o in zip(dims[:-1], dims[1:])]
    return k.clone(), k, v, gates, weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("widths", [[], [16]])
@pytest.mark.parametrize("eta", [None, 0.99])
def test_clipped_memory_stays_finite_and_bounded(widths, eta, backend):
    T, H, D, tau, theta = 4096, 2, 8, 1.0, 0.5
    q, k, v, gates, weights = adversarial(T, H, D, widths, eta, theta)
    weights = [w.requires_grad_(True) for w in weights]
    v.requires_grad_(True)
    o, (W, S) = chunk_titans_memory(q, k, v, *gates, weights=weights, chunk_size=16, inner_grad_clip=tau,
                                    backend=backend)
    assert torch.isfinite(o).all() and all(torch.isfinite(t).all() for t in W + S)
    e = gates[1][0, 0, 0].item()
    s_bound = theta * tau * (T if e == 1 else (1 - e ** T) / (1 - e))  # sum_j eta^j, j < T
    for s in S:
        assert s.flatten(-2).norm(dim=-1).max() <= s_bound * (1 + 1e-4)
    for w, w0 in zip(W, weights):
        assert w.flatten(-2).norm(dim=-1).max() <= w0.flatten(-2).norm(dim=-1).max() + T * s_bound
    # the backward through 4096 tokens at the gates' limits is finite too
    grads = torch.autograd.grad(o.square().mean() + sum(w.square().mean() for w in W), [v, *weights])
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unclipped_memory_diverges_on_the_same_drive(backend):
    """The drive above is adversarial enough: without the clip the memory overflows."""
    q, k, v, gates, weights = adversarial(4096, 2, 8, [16], None)
    with torch.no_grad():
        o, (W, _) = chunk_titans_memory(q, k, v, *gates, weights=weights, chunk_size=16, inner_grad_clip=None,
                                        backend=backend)
    # non-finite, or far past the bound the clip guarantees (theta tau T^2 at eta = 1: 8.4e6)
    big = max(w.abs().max().item() for w in W)
    assert not torch.isfinite(o).all() or not big < 0.5 * 4096 ** 2 * 10
