"""Fused RMSNorm (with and without a gate) and l2 normalisation (kernels/norms) against the
plain-PyTorch formulas of naive.py in float64: outputs and the gradients of x, weight and gate, on
odd widths and on strided views read in place."""

import pytest
import torch

from testutil.kernel_util import on_threads, rel_rms
from titanforge.kernels.norms import fused_cpu, l2_normalize, l2_normalize_reference, rms_norm, rms_norm_reference

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason=f"C norms unavailable: {fused_cpu.status()}")


def grads(out, inputs, probe):
    return torch.autograd.grad((out * probe).sum(), [t for t in inputs if t is not None])


def views(shape, kind, dtype=torch.float64, seed=0):
    """A leaf and the tensor of `shape` read from it: contiguous, a split of a wider last-but-one
    dim (the q/k heads of a fused projection), a time slice (a MAC segment) or a transpose (which
    cannot be read in place and is copied)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "contiguous":
        leaf = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
        return leaf, leaf
    if kind == "head-split":
        leaf = torch.randn(*shape[:-2], shape[-2] + 3, shape[-1], generator=g, dtype=dtype, requires_grad=True)
        return leaf, leaf[..., 1:1 + shape[-2], :]
    if kind == "time-slice":
        leaf = torch.randn(shape[0], shape[1] + 5, *shape[2:], generator=g, dtype=dtype, requires_grad=True)
        return leaf, leaf[:, 2:2 + shape[1]]
    leaf = torch.randn(shape[1], shape[0], *shape[2:], generator=g, dtype=dtype, requires_grad=True)
    return leaf, leaf.transpose(0, 1)


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (3, 11, 33), (2, 9, 4, 64)])
@pytest.mark.parametrize("kind", ["contiguous", "head-split", "time-slice", "transposed"])
@pytest.mark.parametrize("gated", [False, True])
def test_rms_norm_matches_reference(shape, kind, gated, poisoned):
    x_leaf, x = views(shape, kind)
    g_leaf, gate = views(shape, "time-slice" if kind == "contiguous" else kind, seed=1) if gated else (None, None)
    w = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True)
    out = rms_norm(x, w, 1e-5, gate, backend="native")
    ref = rms_norm_reference(x, w, 1e-5, gate)
    assert out.is_contiguous() and rel_rms(out, ref) < 1e-13
    probe = torch.randn_like(ref)
    for a, b in zip(grads(out, [x_leaf, w, g_leaf], probe), grads(ref, [x_leaf, w, g_leaf], probe)):
        assert rel_rms(a, b) < 1e-12


@pytest.mark.parametrize("x_kind,g_kind", [("contiguous", "time-slice"), ("time-slice", "contiguous"),
                                           ("head-split", "contiguous"), ("time-slice", "head-split")])
def test_rms_norm_x_and_gate_in_different_layouts(x_kind, g_kind, poisoned):
    """x and gate read in place even where their leading dims collapse differently (the MAC read:
    a contiguous retrieval gated by a time slice of the whole sequence's gate)."""
    shape = (2, 6, 3, 10)
    x_leaf, x = views(shape, x_kind)
    g_leaf, gate = views(shape, g_kind, seed=1)
    w = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True)
    out = rms_norm(x, w, 1e-5, gate, backend="native")
    ref = rms_norm_reference(x, w, 1e-5, gate)
    assert rel_rms(out, ref) < 1e-13
    probe = torch.randn_like(ref)
    for a, b in zip(grads(out, [x_leaf, w, g_leaf], probe), grads(ref, [x_leaf, w, g_leaf], probe)):
        assert rel_rms(a, b) < 1e-12


def test_rms_norm_broadcast_gate_and_float32():
    x = torch.randn(4, 6, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    gate = torch.rand(4, 1, 40, requires_grad=True)  # broadcast over time: read expanded
    out = rms_norm(x, w, 1e-6, gate, backend="native")
    ref = rms_norm_reference(x.double(), w.double(), 1e-6, gate.double())
    assert rel_rms(out, ref) < 1e-6
    probe = torch.randn_like(ref)
    for a, b in zip(grads(out, [x, w, gate], probe.float()), grads(ref, [x, w, gate], probe)):
        assert rel_rms(a, b) < 1e-5


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (3, 11, 64)])
@pytest.mark.parametrize("kind", ["contiguous", "head-split", "time-slice", "transposed"])
def test_l2_normalize_matches_reference(shape, kind, poisoned):
    leaf, x = views(shape, kind)
    with torch.no_grad():
        leaf.view(-1, shape[-1])[:2] *= 1e-14  # rows below eps: the clamped, linear branch
    out = l2_normalize(x, backend="native")
    ref = l2_normalize_reference(x)
    assert out.is_contiguous() and rel_rms(out, ref) < 1e-13
    probe = torch.randn_like(ref)
    (a,), (b,) = grads(out, [leaf], probe), grads(ref, [leaf], probe)
    assert rel_rms(a, b) < 1e-12


def test_threads_agree():
    x = torch.randn(8, 50, 48, dtype=torch.float64, requires_grad=True)
    w = torch.randn(48, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(8, 50, 48, dtype=torch.float64)
    probe = torch.randn(8, 50, 48, dtype=torch.float64)

    def run():
        out = rms_norm(x, w, 1e-5, gate, backend="native")
        return [out, *grads(out, [x, w], probe), l2_normalize(x, backend="native")]
    one, two = on_threads(run)
    for a, b in zip(one, two):
        assert rel_rms(a, b) < 1e-14  # rows are per thread; only dw's partial sums regroup


def test_fallbacks_and_errors():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    w = torch.ones(8, dtype=torch.bfloat16)
    # auto: low precision runs the reference formulas (computed in float32)
    assert torch.equal(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
    with pytest.raises(ValueError, match="float32/float64"):
        rms_norm(x, w, 1e-5, backend="native")
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \[8\]"):
        rms_norm(x.float(), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="does not broadcast"):
        rms_norm(x.float(), w.float(), 1e-5, gate=torch.ones(2, 3, 4))
    y = torch.randn(3, 5)
    assert torch.equal(l2_normalize(y, backend="torch"), l2_normalize_reference(y))


class _Wrapped(torch.Tensor):
    """A tensor subclass standing in for DTensor: the C loops must not take its data_ptr()."""


def test_tensor_subclasses_take_the_pytorch_path():
    """A DTensor (tensor/sequence parallelism) has no local storage behind data_ptr(): handing it
    to the C loop segfaulted the tensor-parallel workers. "auto" falls back to the formulas, which
    dispatch through the subclass; "native" refuses it with a clear error."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    w = torch.randn(16, generator=g, dtype=torch.float64)
    want = rms_norm_reference(x, w, 1e-6)
    for args in [(x.as_subclass(_Wrapped), w), (x, w.as_subclass(_Wrapped))]:
        got = rms_norm(*args, 1e-6)
        torch.testing.assert_close(got.as_subclass(torch.Tensor), want, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="plain tensors.*_Wrapped"):
            rms_norm(*args, 1e-6, backend="native")
    got = l2_normalize(x.as_subclass(_Wrapped))
    torch.testing.assert_close(got.as_subclass(torch.Tensor), l2_normalize_reference(x), rtol=1e-12, atol=1e-12)
