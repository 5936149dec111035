"""Mamba mixers against step-by-step float64 references (a loop over time that applies the conv
window, projections, norms and one recurrence step per token): outputs and the gradients of the
input and every parameter; pieces with carried state (conv window + SSM state) equal one pass."""

import pytest
import torch
import torch.nn.functional as F

from testutil.kernel_util import rel_rms
from titanforge.models.common.mamba import Mamba2Mixer, MambaMixer



def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_mamba1(m: MambaMixer, x):
    Bsz, T, _ = x.shape
    xs_all, z_all = F.linear(x, m.in_proj.weight).chunk(2, -1)
    K = m.conv1d.weight.shape[-1]
    w = m.conv1d.weight[:, 0]  # [D, K]
    h = x.new_zeros(Bsz, m.D.shape[0], m.d_state)
    eps = m.dt_layernorm.eps
    ys = []
    for t in range(T):
        window = torch.stack([xs_all[:, s] if s >= 0 else torch.zeros_like(xs_all[:, 0])
                              for s in range(t - K + 1, t + 1)], -1)  # [B, D, K]
        xt = F.silu((window * w).sum(-1) + m.conv1d.bias)
        dt, Bt, Ct = F.linear(xt, m.x_proj.weight).split([m.dt_rank, m.d_state, m.d_state], -1)
        dt = rms(dt, m.dt_layernorm.weight, eps)
        Bt, Ct = rms(Bt, m.b_layernorm.weight, eps), rms(Ct, m.c_layernorm.weight, eps)
        delta = F.softplus(F.linear(dt, m.dt_proj.weight, m.dt_proj.bias))  # [B, D]
        A = -torch.exp(m.A_log)
        h = torch.exp(delta[..., None] * A) * h + (delta * xt)[..., None] * Bt[:, None]
        y = (h * Ct[:, None]).sum(-1) + m.D * xt
        ys.append(y * F.silu(z_all[:, t]))
    return F.linear(torch.stack(ys, 1), m.out_proj.weight)


def reference_mamba2(m: Mamba2Mixer, x):
    Bsz, T, _ = x.shape
    H, P, N, G = m.A_log.shape[0], m.headdim, m.d_state, m.n_groups
    inner = H * P
    z_all, xbc_all, dt_all = F.linear(x, m.in_proj.weight).split([inner, inner + 2 * G * N, H], -1)
    K = m.conv1d.weight.shape[-1]
    w = m.conv1d.weight[:, 0]
    h = x.new_zeros(Bsz, H, P, N)
    ys = []
    for t in range(T):
        window = torch.stack([xbc_all[:, s] if s >= 0 else torch.zeros_like(xbc_all[:, 0])
                              for s in range(t - K + 1, t + 1)], -1)
        xt, Bt, Ct = F.silu((window * w).sum(-1) + m.conv1d.bias).split([inner, G * N, G * N], -1)
        xt = xt.view(Bsz, H, P)
        Bt = Bt.view(Bsz, G, N).repeat_interleave(H // G, 1)
        Ct = Ct.view(Bsz, G, N).repeat_interleave(H // G, 1)
        delta = F.softplus(dt_all[:, t] + m.dt_bias)  # [B, H]
        decay = torch.exp(delta * -torch.exp(m.A_log))
        h = decay[..., None, None] * h + (delta[..., None] * xt)[..., None] * Bt[:, :, None]
        y = (h * Ct[:, :, None]).sum(-1) + m.D[:, None] * xt
        y = y.reshape(Bsz, inner) * F.silu(z_all[:, t])
        ys.append(rms(y, m.norm.weight, m.norm.eps))
    return F.linear(torch.stack(ys, 1), m.out_proj.weight)


def perturbed(m):
    m.init_weights()
    with torch.no_grad():
        # Non-trivial norm weights and D so their gradients are exercised.
        for name, p in m.named_parameters():
            if name.endswith("weight") and p.dim() == 1 or name == "D":
                p.add_(0.1 * torch.randn_like(p))
    return m.double()


def check_against_reference(m, ref, T):
    x = torch.randn(2, T, m.out_proj.weight.shape[0], dtype=torch.float64, requires_grad=True)
    cot = torch.randn(2, T, x.shape[-1], dtype=torch.float64)
    grads = []
    for fn in (m, lambda t: ref(m, t)):
        m.zero_grad()
        x.grad = None
        y = fn(x)
        (y * cot).sum().backward()
        grads.append((y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = grads
    assert rel_rms(y, y_ref) < 1e-10
    assert rel_rms(gx, gx_ref) < 1e-10
    for n in gp_ref:
        assert rel_rms(gp[n], gp_ref[n]) < 1e-9, n


@pytest.mark.parametrize("T,chunk", [(63, 16), (37, 64)])
def test_mamba1_mixer_matches_reference(T, chunk):
    m = perturbed(MambaMixer(24, d_state=5, expand=2, chunk_size=chunk))
    check_against_reference(m, reference_mamba1, T)


@pytest.mark.parametrize("T,G", [(63, 1), (30, 2)])
def test_mamba2_mixer_matches_reference(T, G):
    m = perturbed(Mamba2Mixer(24, d_state=6, headdim=8, n_groups=G, chunk_size=16))
    check_against_reference(m, reference_mamba2, T)


@pytest.mark.parametrize("cls,kw", [(MambaMixer, dict(d_state=4)), (Mamba2Mixer, dict(d_state=4, headdim=8))])
def test_mixer_state_split_equals_one_pass(cls, kw):
    m = cls(20, chunk_size=8, **kw)
    m.init_weights()
    m.double()
    x = torch.randn(2, 50, 20, dtype=torch.float64)
    y_full, s_full = m(x, output_final_state=True)
    # Split inside the conv window's reach (2 < K-1 steps in the second-to-last piece).
    y1, s1 = m(x[:, :23], output_final_state=True)
    y2, s2 = m(x[:, 23:25], initial_state=s1, output_final_state=True)
    y3, s3 = m(x[:, 25:], initial_state=s2, output_final_state=True)
    assert rel_rms(torch.cat([y1, y2, y3], 1), y_full) < 1e-12
    assert rel_rms(s3.ssm, s_full.ssm) < 1e-12
    assert rel_rms(s3.conv, s_full.conv) < 1e-12


def test_mixers_build_on_meta_and_run_in_bf16_autocast():
    with torch.device("meta"):
        m = MambaMixer(32)
    m.to_empty(device="cpu")
    m.init_weights()
    x = torch.randn(1, 20, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert torch.isfinite(y.float()).all()
    assert rel_rms(y.float(), m(x)) < 5e-2


def test_mamba2_bad_headdim():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2Mixer(20, headdim=7)
