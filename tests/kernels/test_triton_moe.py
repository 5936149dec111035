"""Triton MoE permutation and weighted un-permutation (kernels/moe/triton.py) against the float64
formulas, outputs and gradients (x, y_sorted, the routing weights), dropless and with dropped
assignments, under the interpreter in float32 with NaN-poisoned outputs."""

import pytest
import torch

from testutil.kernel_util import rel_rms
from titanforge.kernels.moe import permute, permute_reference, unpermute, unpermute_reference
from titanforge.models.common.moe_dispatch import apply_capacity, sort_tokens_by_expert


@pytest.mark.parametrize("N,k,E,C,capacity", [(13, 2, 5, 19, 0), (9, 1, 3, 7, 0), (17, 2, 4, 33, 3)])
def test_permute_and_unpermute_match_reference(N, k, E, C, capacity, poisoned):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    order, counts = sort_tokens_by_expert(ids, E)
    if capacity:
        order, counts, dropped = apply_capacity(order, counts, capacity)
        assert dropped > 0  # the case exercises dropped slots
    x = torch.randn(N, C, requires_grad=True)
    y = torch.randn(order.numel(), C, requires_grad=True)
    w = torch.rand(N, k, requires_grad=True)
    xs = permute(x, order, k, backend="triton")
    out = unpermute(y, order, w, N, backend="triton")
    xd, yd, wd = (t.detach().double().requires_grad_() for t in (x, y, w))
    xsd, outd = permute_reference(xd, order, k), unpermute_reference(yd, order, wd, N)
    assert rel_rms(xs, xsd) == 0 and rel_rms(out, outd) < 1e-6
    p1, p2 = torch.randn_like(xsd), torch.randn_like(outd)
    got = torch.autograd.grad((xs * p1.float()).sum() + (out * p2.float()).sum(), (x, y, w))
    want = torch.autograd.grad((xsd * p1).sum() + (outd * p2).sum(), (xd, yd, wd))
    for a, b in zip(got, want):
        assert rel_rms(a, b) < 1e-6
