"""models/common/layers.py against obviously-correct float64 references.

RMSNorm against its formula, RoPE against a complex-number rotation, attention against an
explicit softmax(q k^T / sqrt(D) + mask) v loop over time and heads; forward and gradients.
Tolerances: float64 paths 1e-10 relative RMS (they differ only by summation order); the float32
RoPE table 2e-5 absolute (float32 angles t * theta_i at t < 100); bf16 RMSNorm 2e-2 relative RMS.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from testutil.kernel_util import rel_rms
from titanforge.models.common import Attention, RMSNorm, SwiGLU, apply_rope, attention, rope_frequencies

F64_TOL = 1e-10


def grads(out: torch.Tensor, inputs, seed_grad: torch.Tensor):
    return torch.autograd.grad(out, inputs, seed_grad)


# RMSNorm

def rmsnorm_reference(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("dim", [7, 48])
def test_rmsnorm_matches_formula_forward_and_grads(dim):
    norm = RMSNorm(dim, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = torch.randn(3, 31, dim, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 31, dim, dtype=torch.float64)
    y = norm(x)
    ref = rmsnorm_reference(x, norm.weight, norm.eps)
    assert y.dtype == torch.float64
    assert rel_rms(y, ref) < F64_TOL
    for a, b in zip(grads(y, (x, norm.weight), g), grads(ref, (x, norm.weight), g)):
        assert rel_rms(a, b) < F64_TOL


def test_rmsnorm_low_precision_computes_in_float32():
    norm = RMSNorm(40)
    x = torch.randn(2, 30, 40) * 50
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = rmsnorm_reference(x.bfloat16().double(), norm.weight.double(), norm.eps)
    assert rel_rms(y, ref) < 2e-2


# RoPE

def rope_reference(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE as a complex product, float64, a loop over time.

    Hugging Face's layout pairs channel i with channel i + D/2: z_i = x_i + 1j * x_{i + D/2},
    rotated by exp(1j * t * theta_i) with theta_i = theta^(-2i / D).
    """
    B, T, H, D = x.shape
    half = D // 2
    theta_i = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / D)
    out = []
    for t in range(T):
        z = torch.complex(x[:, t, :, :half], x[:, t, :, half:])
        z = z * torch.polar(torch.ones_like(theta_i), t * theta_i)
        out.append(torch.cat([z.real, z.imag], dim=-1))
    return torch.stack(out, dim=1)


def float64_table(head_dim: int, T: int, theta: float) -> torch.Tensor:
    theta_i = theta ** (-torch.arange(head_dim // 2, dtype=torch.float64) * 2 / head_dim)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta_i[None]
    return torch.stack([ang.cos(), ang.sin()], dim=-1)


@pytest.mark.parametrize("T,D", [(63, 6), (100, 10)])
def test_rope_matches_complex_rotation(T, D):
    theta = 500.0
    x = torch.randn(2, T, 3, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, T, 3, D, dtype=torch.float64)
    y = apply_rope(x, float64_table(D, T + 5, theta))
    ref = rope_reference(x, theta)
    assert rel_rms(y, ref) < F64_TOL
    assert rel_rms(grads(y, x, g)[0], grads(ref, x, g)[0]) < F64_TOL


def test_rope_table_is_float32_close_to_exact_angles():
    table = rope_frequencies(10, 100, theta=10000.0)
    assert table.shape == (100, 5, 2) and table.dtype == torch.float32
    assert (table.double() - float64_table(10, 100, 10000.0)).abs().max() < 2e-5


def test_rope_scores_depend_only_on_relative_position():
    D, T = 8, 40
    table = float64_table(D, T, 10000.0)
    q, k = torch.randn(2, D, dtype=torch.float64)
    # The same q and k placed at every position: scores(t1, t2) must depend on t1 - t2 only.
    rq = apply_rope(q.expand(1, T, 1, D), table)[0, :, 0]
    rk = apply_rope(k.expand(1, T, 1, D), table)[0, :, 0]
    scores = rq @ rk.T
    for shift in (0, 3, 17):
        diag = torch.diagonal(scores, offset=shift)
        assert (diag - diag[0]).abs().max() < 1e-10
    assert (scores[0, 1] - scores[0, 2]).abs() > 1e-3


def test_rope_rejects_bad_shapes():
    with pytest.raises(ValueError, match="even head dim"):
        rope_frequencies(7, 10)
    with pytest.raises(ValueError, match="does not cover"):
        apply_rope(torch.randn(1, 11, 2, 8), rope_frequencies(8, 10))


# Attention

def attention_reference(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v, a loop over batch, heads and queries. mask: [B, H, T, S] bool."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    rows = []
    for b in range(B):
        for h in range(H):
            for t in range(T):
                s = (k[b, :, h // group] @ q[b, t, h]) / math.sqrt(D)  # [S]
                s = s.masked_fill(~mask[b, h, t], float("-inf"))
                rows.append(torch.softmax(s, dim=0) @ v[b, :, h // group])  # [D]
    return torch.stack(rows).view(B, H, T, D).transpose(1, 2)


def qkv(B, T, S, H, G, D):
    mk = lambda n, heads: torch.randn(B, n, heads, D, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return mk(T, H), mk(S, G), mk(S, G)


@pytest.mark.parametrize("H,G", [(6, 2), (3, 3), (4, 1)])
def test_attention_causal_gqa_matches_loop(H, G):
    B, T, D = 2, 33, 5
    q, k, v = qkv(B, T, T, H, G, D)
    mask = torch.ones(T, T, dtype=torch.bool).tril().expand(B, H, T, T)
    y = attention(q, k, v)
    ref = attention_reference(q, k, v, mask)
    assert rel_rms(y, ref) < F64_TOL
    g = torch.randn_like(y)
    for a, b in zip(grads(y, (q, k, v), g), grads(ref, (q, k, v), g)):
        assert rel_rms(a, b) < F64_TOL


@pytest.mark.parametrize("mask_shape", ["TS", "B1TS"])
def test_attention_boolean_mask_matches_loop(mask_shape):
    B, T, S, H, G, D = 2, 21, 29, 6, 3, 4
    q, k, v = qkv(B, T, S, H, G, D)
    mask = torch.rand(B, 1, T, S) < 0.5
    # Keep at least one key per query: an all-masked row has no defined softmax.
    mask[..., torch.arange(T), torch.arange(T)] = True
    if mask_shape == "TS":
        mask = mask[0, 0]
    y = attention(q, k, v, attn_mask=mask)
    ref = attention_reference(q, k, v, mask.expand(B, H, T, S))
    assert rel_rms(y, ref) < F64_TOL
    g = torch.randn_like(y)
    for a, b in zip(grads(y, (q, k, v), g), grads(ref, (q, k, v), g)):
        assert rel_rms(a, b) < F64_TOL


def test_attention_non_causal_matches_loop():
    q, k, v = qkv(1, 17, 17, 2, 1, 6)
    ref = attention_reference(q, k, v, torch.ones(1, 2, 17, 17, dtype=torch.bool))
    assert rel_rms(attention(q, k, v, causal=False), ref) < F64_TOL


def test_attention_module_reads_heads_from_weights():
    # Two "tensor-parallel shards", each holding one key/value group and its query heads, must
    # sum to the full module: heads come from the weight shapes, not from constructor arguments.
    C, H, G = 24, 6, 2
    D = C // H
    full = Attention(C, H, G).double()
    x = torch.randn(2, 19, C, dtype=torch.float64)
    freqs = float64_table(D, 19, 10000.0)
    total = torch.zeros_like(x)
    for r in range(G):
        shard = Attention(C, H, G).double()
        qs, kvs = slice(r * D * H // G, (r + 1) * D * H // G), slice(r * D, (r + 1) * D)
        with torch.no_grad():
            shard.wq.weight = torch.nn.Parameter(full.wq.weight[qs].clone())
            shard.wk.weight = torch.nn.Parameter(full.wk.weight[kvs].clone())
            shard.wv.weight = torch.nn.Parameter(full.wv.weight[kvs].clone())
            shard.wo.weight = torch.nn.Parameter(full.wo.weight[:, qs].clone())
        total = total + shard(x, freqs)
    assert rel_rms(total, full(x, freqs)) < F64_TOL


def test_swiglu_matches_formula():
    ffn = SwiGLU(10, 26).double()
    x = torch.randn(3, 7, 10, dtype=torch.float64)
    a, b = x @ ffn.w1.weight.T, x @ ffn.w3.weight.T
    ref = (a * torch.sigmoid(a) * b) @ ffn.w2.weight.T
    assert rel_rms(ffn(x), ref) < F64_TOL
    assert rel_rms(F.silu(a), a * torch.sigmoid(a)) < F64_TOL
