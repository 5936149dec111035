"""The Titans memory's input op (kernels/titans_memory/inputs.py): the C loop and the PyTorch form
against a reference built from F.conv1d, F.normalize and sigmoids (float64), for outputs, the
carried conv cache and the gradients of z, the conv weights and the incoming cache."""

import pytest
import torch
import torch.nn.functional as F

from testutil.kernel_util import on_threads, rel_rms
from titanforge.kernels.native import load
from titanforge.kernels.titans_memory.inputs import SOURCE, titans_memory_inputs

BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(load(SOURCE) is None,
                                                                     reason="C memory inputs unavailable"))]
THETA_MAX = 0.1


def reference(z, conv_weight, cache, H, theta_max=THETA_MAX, gate_bias=None):
    B, T, _ = z.shape
    C3, K = conv_weight.shape[0], conv_weight.shape[-1]
    D = C3 // (3 * H)
    pre = cache if cache is not None else z.new_zeros(B, K - 1, C3)
    xc = torch.cat([pre, z[..., :C3]], 1)  # [B, K-1+T, C3]
    a = F.conv1d(xc.transpose(1, 2), conv_weight, groups=C3).transpose(1, 2)
    u = F.silu(a).reshape(B, T, 3, H, D)
    q, k, v = F.normalize(u[:, :, 0], dim=-1), F.normalize(u[:, :, 1], dim=-1), u[:, :, 2]
    lg = z[..., C3:] if gate_bias is None else z[..., C3:] + gate_bias
    gates = (theta_max * torch.sigmoid(lg[..., :H]), torch.sigmoid(lg[..., H:2 * H]), torch.sigmoid(lg[..., 2 * H:]))
    return q, k, v, gates, xc[:, T:]


def make(B, T, H, D, K, with_cache, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    C3 = 3 * H * D
    z = r(B, T, C3 + 3 * H)
    z[0, 0, :H * D] = 0  # a zero q row: the norm's clamped branch
    return dict(z=z, conv_weight=0.5 * r(C3, 1, K), cache=r(B, K - 1, C3) if with_cache else None)


def flat(out):
    q, k, v, gates, cache = out
    return [q, k, v, *gates, cache]


def run(fn, kw, H):
    leaves = {n: t.clone().requires_grad_(True) for n, t in kw.items() if t is not None}
    extra = (leaves["gate_bias"],) if "gate_bias" in leaves else ()
    outs = flat(fn(leaves["z"], leaves["conv_weight"], leaves.get("cache"), H, *extra))
    g = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return outs, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,H,D,K", [(2, 7, 3, 5, 4), (1, 2, 2, 8, 4), (2, 33, 4, 16, 3), (1, 1, 1, 3, 2),
                                       (2, 19, 2, 64, 4)])
@pytest.mark.parametrize("with_cache", [True, False])
def test_matches_reference(backend, B, T, H, D, K, with_cache, poisoned):
    kw = make(B, T, H, D, K, with_cache)
    outs_ref, grads_ref = run(reference, kw, H)
    outs, grads = run(lambda z, w, c, H: titans_memory_inputs(z, w, c, H, THETA_MAX, backend=backend), kw, H)
    for a, b in zip(outs, outs_ref):
        assert a.shape == b.shape and rel_rms(a, b) < 1e-13
    for a, b in zip(grads, grads_ref):
        assert rel_rms(a, b) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_pieces_with_carried_cache_equal_one_pass(backend):
    kw = make(2, 21, 2, 6, 4, with_cache=False)
    z = kw["z"].clone().requires_grad_(True)
    w = kw["conv_weight"]

    def op(zz, cache):
        return titans_memory_inputs(zz, w, cache, 2, THETA_MAX, backend=backend)
    whole = flat(op(z, None))
    first = op(z[:, :9], None)
    second = op(z[:, 9:], first[-1])
    pieces = [torch.cat([a, b], 1) for a, b in zip(flat(first)[:-1], flat(second)[:-1])]
    for a, b in zip(pieces, whole[:-1]):
        assert rel_rms(a, b) < 1e-14
    probe = [torch.randn_like(t) for t in pieces]
    g1, = torch.autograd.grad(sum((a * p).sum() for a, p in zip(pieces, probe)), [z])
    g2, = torch.autograd.grad(sum((a * p).sum() for a, p in zip(whole[:-1], probe)), [z])
    assert rel_rms(g1, g2) < 1e-13


@pytest.mark.skipif(load(SOURCE) is None, reason="C memory inputs unavailable")
def test_native_reads_a_strided_projection_and_threads_agree():
    kw = make(3, 40, 2, 32, 4, with_cache=True)
    wide = torch.cat([kw["z"], torch.randn(3, 40, 5, dtype=torch.float64)], -1)

    def go():
        z = wide.clone().requires_grad_(True)
        outs = flat(titans_memory_inputs(z[..., :kw["z"].shape[-1]], kw["conv_weight"], kw["cache"], 2, THETA_MAX,
                                         backend="native"))
        g, = torch.autograd.grad(sum(o.sum() for o in outs), [z])
        return [*outs, g]
    one, two = on_threads(go)
    ref, _ = run(reference, kw, 2)
    for a, b in zip(one[:7], ref):
        assert rel_rms(a, b) < 1e-13
    for a, b in zip(one, two):
        assert rel_rms(a, b) < 1e-14
    assert torch.all(one[-1][..., -5:] == 0)  # the columns outside the view get no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_bias_added_inside_matches_reference(backend, poisoned):
    """The gates' bias enters the op (the projection before it is then a plain matmul): outputs and
    the gradients of z, the conv weight, the cache and the bias against the reference."""
    kw = make(2, 11, 3, 6, 4, with_cache=True, seed=3)
    kw["gate_bias"] = torch.randn(9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    outs_ref, grads_ref = run(lambda z, w, c, H, b: reference(z, w, c, H, gate_bias=b), kw, 3)
    outs, grads = run(lambda z, w, c, H, b: titans_memory_inputs(z, w, c, H, THETA_MAX, backend=backend,
                                                                 gate_bias=b), kw, 3)
    assert len(grads) == 4
    for a, b in zip(outs, outs_ref):
        assert rel_rms(a, b) < 1e-13
    for a, b in zip(grads, grads_ref):
        assert rel_rms(a, b) < 1e-12


def test_bad_shapes_raise_clear_errors():
    kw = make(1, 4, 2, 3, 4, with_cache=True)
    with pytest.raises(ValueError, match=r"expected \[B, T, 3C \+ 3H\]"):
        titans_memory_inputs(kw["z"][..., :-1], kw["conv_weight"], kw["cache"], 2, THETA_MAX)
    with pytest.raises(ValueError, match=r"cache has shape \(1, 2, 18\), expected \[1, 3, 18\]"):
        titans_memory_inputs(kw["z"], kw["conv_weight"], kw["cache"][:, 1:], 2, THETA_MAX)
    with pytest.raises(ValueError, match=r"gate_bias has shape \(5,\), expected \[6\]"):
        titans_memory_inputs(kw["z"], kw["conv_weight"], kw["cache"], 2, THETA_MAX, gate_bias=torch.zeros(5))
