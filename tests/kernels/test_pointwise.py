"""Fused SwiGLU gating and RoPE (kernels/pointwise) against the plain formulas of naive.py and
against independent forms (silu written out with exp; the rotation as a complex product), in
float64: outputs and every gradient, on odd sizes and on strided views read in place."""

import math

import pytest
import torch

from testutil.kernel_util import on_threads, rel_rms
from titanforge.kernels.pointwise import fused_cpu, rope, rope_reference, swiglu, swiglu_reference
from titanforge.models.common import rope_frequencies

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason=f"C pointwise ops unavailable: {fused_cpu.status()}")


def grads(out, inputs, probe):
    return torch.autograd.grad((out * probe).sum(), inputs, retain_graph=True)


def swiglu_by_hand(a, b):
    return a / (1 + torch.exp(-a)) * b


def rope_complex(x, freqs):
    """The rotation as a complex product: (x_i + i x_{i+D/2}) * (cos_{t,i} + i sin_{t,i})."""
    T, D = x.shape[1], x.shape[-1]
    z = torch.complex(x[..., :D // 2], x[..., D // 2:])
    f = freqs[:T].to(x.dtype)
    r = z * torch.complex(f[..., 0], f[..., 1])[None, :, None, :]
    return torch.cat([r.real, r.imag], -1)


@pytest.mark.parametrize("shape", [(7,), (3, 5, 33), (2, 17, 682)])
def test_swiglu_matches_reference(shape, poisoned):
    g = torch.Generator().manual_seed(0)
    a = (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    out = swiglu(a, b, backend="native")
    for ref in (swiglu_reference(a, b), swiglu_by_hand(a, b)):
        assert rel_rms(out, ref) < 1e-14
        probe = torch.randn(*shape, generator=g, dtype=torch.float64)
        for x, y in zip(grads(out, [a, b], probe), grads(ref, [a, b], probe)):
            assert rel_rms(x, y) < 1e-13


def test_swiglu_float32_extremes():
    """float32 through the vector exp2: large |a| saturate the sigmoid without NaN or overflow."""
    a = torch.cat([torch.linspace(-120, 120, 241), torch.randn(1000)]).requires_grad_()
    b = torch.randn_like(a).requires_grad_()
    out = swiglu(a, b, backend="native")
    ref = swiglu_reference(a.double(), b.double())
    assert torch.isfinite(out).all() and rel_rms(out, ref) < 1e-6
    probe = torch.randn_like(ref)
    for x, y in zip(grads(out, [a, b], probe.float()), grads(ref, [a, b], probe)):
        assert torch.isfinite(x).all() and rel_rms(x, y) < 1e-6


def views(B, T, H, D, kind, g):
    """A leaf and x [B, T, H, D] read from it: contiguous, heads split from a fused projection
    (as the attention's q, k of [q | k | v]), a time slice, or a transpose (copied)."""
    if kind == "contiguous":
        leaf = torch.randn(B, T, H, D, generator=g, dtype=torch.float64, requires_grad=True)
        return leaf, leaf
    if kind == "head-split":
        leaf = torch.randn(B, T, 3 * H * D, generator=g, dtype=torch.float64, requires_grad=True)
        return leaf, leaf[..., H * D:2 * H * D].unflatten(-1, (H, D))
    if kind == "time-slice":
        leaf = torch.randn(B, T + 4, H, D, generator=g, dtype=torch.float64, requires_grad=True)
        return leaf, leaf[:, 3:3 + T]
    leaf = torch.randn(B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    return leaf, leaf.transpose(1, 2)


@pytest.mark.parametrize("B,T,H,D", [(1, 1, 1, 2), (2, 13, 3, 6), (2, 37, 4, 64)])
@pytest.mark.parametrize("kind", ["contiguous", "head-split", "time-slice", "transposed"])
def test_rope_matches_reference(B, T, H, D, kind, poisoned):
    g = torch.Generator().manual_seed(1)
    leaf, x = views(B, T, H, D, kind, g)
    freqs = rope_frequencies(D, T + 5)  # a table longer than x: rows 0..T-1 are used
    out = rope(x, freqs, backend="native")
    assert out.is_contiguous()
    for ref in (rope_reference(x, freqs), rope_complex(x, freqs)):
        assert rel_rms(out, ref) < 1e-14
        probe = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
        (a,), (b,) = grads(out, [leaf], probe), grads(ref, [leaf], probe)
        assert rel_rms(a, b) < 1e-13


def test_rope_float32_and_gathered_table():
    """float32 x with the float32 table, rows gathered as the MAC segments use them (t mod L)."""
    x = torch.randn(2, 20, 3, 8, requires_grad=True)
    freqs = rope_frequencies(8, 8)[torch.arange(20) % 8]
    out = rope(x, freqs, backend="native")
    ref = rope_reference(x.double(), freqs.double())
    assert rel_rms(out, ref) < 1e-6
    probe = torch.randn_like(ref)
    (a,), (b,) = grads(out, [x], probe.float()), grads(ref, [x], probe)
    assert rel_rms(a, b) < 1e-6
    assert math.isclose(out.norm().item(), x.norm().item(), rel_tol=1e-5)  # a rotation keeps norms


def test_threads_agree():
    a = torch.randn(40, 300, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, 300, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 30, 4, 16, dtype=torch.float64, requires_grad=True)
    freqs = rope_frequencies(16, 30)

    def run():
        y, r = swiglu(a, b, backend="native"), rope(x, freqs, backend="native")
        return [y, r, *torch.autograd.grad(y.sum() + (r * r.detach()).sum(), [a, b, x])]
    one, two = on_threads(run)
    for p, q in zip(one, two):
        assert torch.equal(p, q)  # elementwise: no reduction regroups across threads


class _Wrapped(torch.Tensor):
    """A tensor subclass standing in for DTensor."""


def test_fallbacks_and_errors():
    a, b = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(swiglu(a, b), swiglu_reference(a, b))
    with pytest.raises(ValueError, match="float32/float64"):
        swiglu(a, b, backend="native")
    with pytest.raises(ValueError, match="one shape"):
        swiglu(a, b[:2])
    with pytest.raises(ValueError, match="plain tensors"):
        swiglu(a.float().as_subclass(_Wrapped), b.float(), backend="native")
    x = torch.randn(2, 9, 2, 8)
    with pytest.raises(ValueError, match=r"does not cover x \(2, 9, 2, 8\).*max_seq_len>=T"):
        rope(x, rope_frequencies(8, 8))
    with pytest.raises(ValueError, match="does not cover"):
        rope(x, rope_frequencies(6, 16))
    got = rope(x.as_subclass(_Wrapped), rope_frequencies(8, 9))
    assert torch.equal(got.as_subclass(torch.Tensor), rope_reference(x, rope_frequencies(8, 9)))
