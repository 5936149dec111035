"""Triton RMSNorm (+ gate, + residual) and the fused linear + cross-entropy against their float64
references, outputs and every gradient, under the interpreter on CPU (float32, odd sizes, ragged
last blocks, NaN-poisoned outputs); bfloat16 on a GPU only (`gpu` marker)."""

import pytest
import torch

from testutil.kernel_util import rel_rms
from titanforge.kernels.loss import linear_cross_entropy, linear_cross_entropy_reference
from titanforge.kernels.norms import add_rms_norm, rms_norm, rms_norm_reference

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def f64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


@pytest.mark.parametrize("shape,gate_shape", [((3, 7, 37), None), ((2, 5, 3, 19), (5, 3, 19)),
                                              ((1, 1, 130), (1, 1, 130))])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_triton_matches_reference(shape, gate_shape, residual, poisoned):
    x = torch.randn(shape, requires_grad=True)
    w = (1 + 0.3 * torch.randn(shape[-1])).requires_grad_()
    g = torch.randn(gate_shape, requires_grad=True) if gate_shape else None
    r = torch.randn(shape, requires_grad=True) if residual else None
    if residual:
        y, h = add_rms_norm(x, r, w, 1e-5, g, backend="triton")
    else:
        y, h = rms_norm(x, w, 1e-5, g, backend="triton"), x
    xd, wd, gd, rd = f64(x, w, g, r)
    hd = xd + rd if residual else xd
    yd = rms_norm_reference(hd, wd, 1e-5, gd)
    assert y.dtype == torch.float32 and rel_rms(y, yd) < 1e-6 and rel_rms(h, hd) < 1e-7
    dy, dh = torch.randn_like(y), torch.randn_like(y)
    leaves = [t for t in (x, w, g, r) if t is not None]
    loss = (y * dy).sum() + ((h * dh).sum() if residual else 0)
    lossd = (yd * dy.double()).sum() + ((hd * dh.double()).sum() if residual else 0)
    leaves_d = [t for t in (xd, wd, gd, rd) if t is not None]
    for a, b in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(lossd, leaves_d)):
        assert rel_rms(a, b) < 1e-5


@pytest.mark.parametrize("M,C,V,chunk", [(26, 17, 101, 5), (9, 8, 300, 0), (7, 3, 5, 7)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_cross_entropy_matches_reference(M, C, V, chunk, backend, poisoned):
    x = torch.randn(M, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    t = torch.randint(0, V, (M,))
    t[1] = -100  # an ignored token: no loss, no gradient
    loss = linear_cross_entropy(x, w, t, chunk_size=chunk, backend=backend)
    xd, wd = f64(x, w)
    ref = linear_cross_entropy_reference(xd, wd, t)
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1, abs(ref.item()))
    for a, b in zip(torch.autograd.grad(2.5 * loss, (x, w)), torch.autograd.grad(2.5 * ref, (xd, wd))):
        assert rel_rms(a, b) < 1e-5
    assert loss.grad_fn is not None and not torch.isnan(loss)


def test_linear_cross_entropy_without_grad_and_all_ignored():
    x, w = torch.randn(4, 6), torch.randn(11, 6)
    with torch.no_grad():
        ref = linear_cross_entropy_reference(x.double(), w.double(), torch.tensor([1, 2, 3, 4]))
        assert abs(linear_cross_entropy(x, w, torch.tensor([1, 2, 3, 4]), backend="triton").item() - ref.item()) < 1e-5
    # All targets ignored: the mean over no tokens is 0 with zero gradients, not NaN.
    xg = x.requires_grad_()
    loss = linear_cross_entropy(xg, w, torch.full((4,), -100), backend="triton")
    (gx,) = torch.autograd.grad(loss, xg)
    assert loss.item() == 0 and torch.all(gx == 0)


def test_linear_cross_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weight \\[V, C\\]"):
        linear_cross_entropy(torch.randn(4, 6), torch.randn(11, 5), torch.zeros(4, dtype=torch.long))


@pytest.mark.gpu
def test_bf16_kernels_on_gpu():
    dev = "cuda"
    x = torch.randn(4, 333, 1024, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1024, device=dev, requires_grad=True)
    g = torch.randn_like(x, requires_grad=True)
    y = rms_norm(x, w, 1e-5, g, backend="triton")
    yd = rms_norm_reference(*f64(x, w), 1e-5, g.detach().double())
    assert y.dtype == torch.bfloat16 and rel_rms(y, yd) < 1e-2
    M, C, V = 1000, 512, 32000
    xs = torch.randn(M, C, device=dev, dtype=torch.bfloat16, requires_grad=True)
    W = (0.05 * torch.randn(V, C, device=dev, dtype=torch.bfloat16)).requires_grad_()
    t = torch.randint(0, V, (M,), device=dev)
    loss = linear_cross_entropy(xs, W, t, backend="triton")
    xd, Wd = f64(xs, W)
    ref = linear_cross_entropy_reference(xd, Wd, t)
    assert abs(loss.item() - ref.item()) < 2e-2 * abs(ref.item())
    for a, b in zip(torch.autograd.grad(loss, (xs, W)), torch.autograd.grad(ref, (xd, Wd))):
        assert rel_rms(a, b) < 3e-2
