"""The Mamba mixers' causal depthwise conv + SiLU, both paths (the fused C loop and PyTorch
multiply-adds), against F.conv1d in float64: outputs, the new conv state, and the gradients of
the input, taps, bias and incoming conv state, on odd lengths (incl. T < K-1) and channel counts
that leave a partial 64-channel tile."""

import pytest
import torch
import torch.nn.functional as F

from testutil.kernel_util import on_threads, poisoned_empty, rel_rms
import titanforge.kernels.native as native
from titanforge.kernels.mamba import causal_conv1d_silu
from titanforge.kernels.mamba import conv as conv_mod


@pytest.fixture(autouse=True)
def _poison_empty():
    with poisoned_empty():
        yield


def reference(x, weight, bias, conv_state):
    """F.conv1d over [state | x] (channels first), then SiLU; the new state is the last K-1 inputs."""
    K = weight.shape[-1]
    if conv_state is None:
        conv_state = x.new_zeros(x.shape[0], x.shape[2], K - 1)
    xc = torch.cat([conv_state, x.transpose(1, 2)], -1)  # [B, D, K-1+T]
    y = F.conv1d(xc, weight, bias, groups=x.shape[2])  # [B, D, T]
    return F.silu(y.transpose(1, 2)), xc[..., xc.shape[-1] - (K - 1):]


def inputs(Bsz, T, D, K, with_bias, with_state, dtype=torch.float64):
    g = torch.Generator().manual_seed(T * 31 + D + K)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=r(Bsz, T, D), weight=r(D, 1, K) * 0.5, bias=r(D) if with_bias else None,
                conv_state=r(Bsz, D, K - 1) if with_state else None)


def run(fn, kw):
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in kw.items()}
    y, state = fn(**leaves)
    g = torch.Generator().manual_seed(5)
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)).sum() \
        + (state * torch.randn(state.shape, generator=g, dtype=torch.float64).to(y.dtype)).sum()
    loss.backward()
    return y.detach(), state.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("Bsz,T,D,K", [(2, 63, 70, 4), (1, 2, 9, 4), (3, 5, 130, 2), (1, 1, 64, 5), (2, 37, 24, 3)])
@pytest.mark.parametrize("with_bias,with_state", [(True, True), (False, False), (True, False)])
def test_conv_silu_matches_conv1d(backend, Bsz, T, D, K, with_bias, with_state):
    kw = inputs(Bsz, T, D, K, with_bias, with_state)
    y_ref, s_ref, g_ref = run(reference, kw)
    y, s, g = run(lambda **a: causal_conv1d_silu(**a, backend=backend), kw)
    assert rel_rms(y, y_ref) < 1e-12
    assert torch.equal(s, s_ref)
    for k in g_ref:
        assert rel_rms(g[k], g_ref[k]) < 1e-12, k


def test_conv_silu_float32():
    kw = inputs(2, 100, 130, 4, True, True)
    y_ref, _, g_ref = run(reference, kw)
    y, _, g = run(lambda **a: causal_conv1d_silu(**{k: (v.float() if v is not None else None) for k, v in a.items()},
                                                 backend="native"), kw)
    assert y.dtype == torch.float32
    assert rel_rms(y.double(), y_ref) < 1e-6
    for k in g_ref:
        assert rel_rms(g[k].double(), g_ref[k]) < 1e-6, k


def test_conv_silu_threads_give_identical_results():
    kw = inputs(2, 50, 130, 4, True, True, torch.float32)
    one, two = on_threads(lambda: run(lambda **a: causal_conv1d_silu(**a, backend="native"), kw))
    assert torch.equal(one[0], two[0])
    for k in one[2]:
        assert torch.equal(one[2][k], two[2][k]), k


def test_conv_silu_split_equals_one_pass():
    kw = inputs(2, 40, 70, 4, True, True)
    y, s = causal_conv1d_silu(**kw)
    first = dict(kw, x=kw["x"][:, :17])
    y1, s1 = causal_conv1d_silu(**first)
    y2, s2 = causal_conv1d_silu(**dict(kw, x=kw["x"][:, 17:], conv_state=s1))
    assert rel_rms(torch.cat([y1, y2], 1), y) < 1e-14
    assert torch.equal(s2, s)


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")
def test_conv_builds_where_a_compiler_exists():
    assert conv_mod.status() == "native"


def test_conv_bad_backend():
    kw = inputs(1, 4, 8, 4, True, False)
    with pytest.raises(ValueError, match="backend='cuda'"):
        causal_conv1d_silu(**kw, backend="cuda")


def test_conv_silu_backward_takes_a_strided_output_gradient():
    # The output gradient arrives transposed; its contiguous copy must live until the C loop has
    # read it (a ptr() of a temporary once handed the loop memory glibc had already reused).
    kw = inputs(2, 40, 96, 4, True, True)
    probe = torch.randn(2, 96, 40, dtype=torch.float64).transpose(1, 2)  # [B, T, D], strided
    grads = []
    for fn in (reference, lambda **a: causal_conv1d_silu(**a, backend="native")):
        leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in kw.items()}
        y, _ = fn(**leaves)
        y.backward(probe)
        grads.append([leaves[k].grad for k in ("x", "weight", "bias", "conv_state")])
    for a, b in zip(*grads[::-1]):
        assert rel_rms(a, b) < 1e-12
