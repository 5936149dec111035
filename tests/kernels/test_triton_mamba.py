"""Triton selective scan and causal conv1d + SiLU (kernels/mamba/triton.py) against the float64
references, outputs and every gradient (initial state and final-state gradient included), under the
interpreter on CPU in float32: odd sizes, several time blocks with a ragged last one, NaN-poisoned
outputs. bfloat16 runs on a GPU only (`gpu` marker)."""

import pytest
import torch
import torch.nn.functional as F

import titanforge.kernels.mamba.triton as mamba_triton
from testutil.kernel_util import rel_rms
from titanforge.kernels.mamba import (causal_conv1d_silu, chunk_selective_scan, chunk_ssd, naive_selective_scan,
                                     naive_ssd)


def scan_inputs(Bsz, T, D, N, dtype=torch.float32, device="cpu", gate=True, skip=True, h0=True):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ins = dict(u=r(Bsz, T, D), delta=F.softplus(r(Bsz, T, D) - 1), A=-torch.exp(r(D, N) * 0.5), B=r(Bsz, T, N),
               C=r(Bsz, T, N), D=r(D) if skip else None, z=r(Bsz, T, D) if gate else None,
               initial_state=r(Bsz, D, N) if h0 else None)
    return {k: None if v is None else v.to(device, dtype).requires_grad_() for k, v in ins.items()}


def grads_of(fn, ins, probes):
    y, h = fn(**ins, output_final_state=True)
    leaves = [v for v in ins.values() if v is not None]
    return (y, h), torch.autograd.grad((y * probes[0]).sum() + (h * probes[1]).sum(), leaves)


@pytest.mark.parametrize("Bsz,T,D,N,opts", [(2, 19, 5, 3, {}), (1, 8, 3, 4, dict(gate=False, skip=False, h0=False)),
                                            (1, 11, 2, 1, dict(h0=False))])
def test_selective_scan_triton_matches_naive(Bsz, T, D, N, opts, monkeypatch, poisoned):
    monkeypatch.setattr(mamba_triton, "INTERPRETER_BT", 8)  # T = 19: blocks of 8, 8, 3
    ins = scan_inputs(Bsz, T, D, N, **opts)
    ref_ins = {k: None if v is None else v.detach().double().requires_grad_() for k, v in ins.items()}
    probes = torch.randn(Bsz, T, D, dtype=torch.float64), torch.randn(Bsz, D, N, dtype=torch.float64)
    (y, h), g = grads_of(lambda **kw: chunk_selective_scan(**kw, backend="triton"), ins, [p.float() for p in probes])
    (yr, hr), gr = grads_of(naive_selective_scan, ref_ins, probes)
    assert y.dtype == torch.float32 and rel_rms(y, yr) < 1e-5 and rel_rms(h, hr) < 1e-5
    for a, b in zip(g, gr):
        assert rel_rms(a, b) < 1e-5


@pytest.mark.parametrize("Bsz,T,D,K,bias,state", [(2, 13, 6, 4, True, True), (1, 5, 3, 4, False, False),
                                                  (1, 2, 5, 4, True, True), (2, 7, 3, 2, True, False)])
def test_causal_conv_triton_matches_reference(Bsz, T, D, K, bias, state, poisoned):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(Bsz, T, D, generator=g, requires_grad=True)
    w = torch.randn(D, 1, K, generator=g, requires_grad=True)
    b = torch.randn(D, generator=g, requires_grad=True) if bias else None
    st = torch.randn(Bsz, D, K - 1, generator=g, requires_grad=True) if state else None
    y, s = causal_conv1d_silu(x, w, b, st, backend="triton")
    leaves = [t for t in (x, w, b, st) if t is not None]
    xd, wd, bd, sd = (None if t is None else t.detach().double().requires_grad_() for t in (x, w, b, st))
    pre = sd if sd is not None else torch.zeros(Bsz, D, K - 1, dtype=torch.float64)
    full = torch.cat([pre, xd.transpose(1, 2)], 2)  # [B, D, K-1+T]
    yd = F.silu(F.conv1d(full, wd, bd, groups=D)).transpose(1, 2)
    assert rel_rms(y, yd) < 1e-6 and torch.equal(s, full[:, :, -(K - 1):].float())
    probe = torch.randn_like(yd)
    for a, c in zip(torch.autograd.grad((y * probe.float()).sum(), leaves),
                    torch.autograd.grad((yd * probe).sum(), [t for t in (xd, wd, bd, sd) if t is not None])):
        assert rel_rms(a, c) < 1e-5


def ssd_inputs(Bsz, T, H, G, P, N, dtype=torch.float64, device="cpu", skip=True, h0=True):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ins = dict(x=r(Bsz, T, H, P), dt=F.softplus(r(Bsz, T, H) - 1), A=-torch.exp(r(H) * 0.5), B=r(Bsz, T, G, N),
               C=r(Bsz, T, G, N), D=r(H) if skip else None, initial_state=r(Bsz, H, P, N) if h0 else None)
    return {k: None if v is None else v.to(device, dtype).requires_grad_() for k, v in ins.items()}


@pytest.mark.parametrize("Bsz,T,H,G,P,N,chunk,opts", [(2, 19, 4, 2, 5, 3, 8, {}), (1, 16, 2, 1, 4, 4, 4, {}),
                                                      (1, 5, 1, 1, 3, 2, 8, dict(skip=False, h0=False))])
def test_ssd_triton_matches_naive(Bsz, T, H, G, P, N, chunk, opts, poisoned):
    """Float64 storage (the kernel computes in float32) so both sides draw the same probes; ragged
    last chunk, grouped B/C, odd P and N (masked tiles)."""
    ins = ssd_inputs(Bsz, T, H, G, P, N, **opts)
    from titanforge.kernels.mamba.triton import ssd_triton

    y, h = ssd_triton(**ins, chunk=chunk)
    yr, hr = naive_ssd(**ins, output_final_state=True)
    assert rel_rms(y, yr) < 1e-6 and rel_rms(h, hr) < 1e-6
    leaves = [v for v in ins.values() if v is not None]
    dy, dh = torch.randn_like(yr), torch.randn_like(hr)
    for a, b in zip(torch.autograd.grad((y * dy).sum() + (h * dh).sum(), leaves),
                    torch.autograd.grad((yr * dy).sum() + (hr * dh).sum(), leaves)):
        assert rel_rms(a, b) < 1e-5
    y32, _ = chunk_ssd(**{k: None if v is None else v.detach().float() for k, v in ins.items()}, chunk_size=chunk,
                       backend="triton")
    assert rel_rms(y32, yr) < 1e-5


@pytest.mark.gpu
def test_mamba_kernels_bf16_on_gpu():
    ins = scan_inputs(2, 1000, 256, 16, dtype=torch.bfloat16, device="cuda")
    ref_ins = {k: None if v is None else v.detach().double().requires_grad_() for k, v in ins.items()}
    probes = torch.randn(2, 1000, 256, device="cuda", dtype=torch.float64), torch.randn(2, 256, 16, device="cuda",
                                                                                      dtype=torch.float64)
    (y, h), g = grads_of(lambda **kw: chunk_selective_scan(**kw, backend="triton"), ins,
                         [probes[0].bfloat16(), probes[1].float()])
    (yr, hr), gr = grads_of(naive_selective_scan, ref_ins, probes)
    assert rel_rms(y, yr) < 2e-2 and rel_rms(h, hr) < 2e-2
    for a, b in zip(g, gr):
        assert rel_rms(a, b) < 5e-2
    x = torch.randn(2, 1000, 512, device="cuda", dtype=torch.bfloat16)
    w, bias = torch.randn(512, 1, 4, device="cuda"), torch.randn(512, device="cuda")
    y, _ = causal_conv1d_silu(x, w, bias, None, backend="triton")
    yr, _ = causal_conv1d_silu(x.double(), w.double(), bias.double(), None, backend="torch")
    assert rel_rms(y, yr) < 1e-2
    ins = ssd_inputs(2, 1000, 8, 1, 64, 64, dtype=torch.float32, device="cuda")
    y, _ = chunk_ssd(**{k: (v.bfloat16() if k == "x" else v) for k, v in ins.items()}, chunk_size=64)
    yr, _ = naive_ssd(**{k: None if v is None else v.double() for k, v in ins.items()})
    assert rel_rms(y, yr) < 2e-2
