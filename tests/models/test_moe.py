"""MoE layer against a dense per-token loop in float64, hand-computed auxiliary losses, capacity rule.

The reference (`dense_reference`) routes and mixes each token on its own with Python loops, so it
shares no dispatch code with the layer under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from testutil.kernel_util import rel_rms
from titanforge.models.registry import collect_aux_losses
from titanforge.models.common.moe import (
    MoE,
    MoEConfig,
    TopKRouter,
    apply_capacity,
    balance_stats,
    expert_capacity,
    expert_forward,
    load_balancing_loss,
    pooled_load_balance,
    router_z_loss,
    sort_tokens_by_expert,
)


def make_moe(dim=20, hidden=28, dtype=torch.float64, **cfg) -> MoE:
    cfg = {"n_experts": 6, "top_k": 3, "load_balance_coef": 0.1, "z_loss_coef": 0.01, **cfg}
    moe = MoE(dim, hidden, MoEConfig(**cfg), init_std=0.3).to(dtype)
    moe.init_weights()
    return moe


def dense_reference(x, gate, w1, w3, w2, cfg: MoEConfig, keep=None):
    """Token-by-token loop. Returns (y [N, C], load balance, z-loss, expert ids [N, k]).

    keep(n, e) -> bool decides whether assignment (token n, expert e) is computed (capacity).
    """
    N, E, k = x.shape[0], cfg.n_experts, cfg.top_k
    logits = x @ gate.t()
    probs = logits.softmax(-1)
    ys, ids, counts = [], [], [0] * E
    for n in range(N):
        w, e_n = probs[n].topk(k)
        if cfg.topk_norm in ("renormalize", "l1"):
            w = w / w.sum()
        y = torch.zeros_like(x[n])
        for j in range(k):
            e = int(e_n[j])
            counts[e] += 1
            if keep is None or keep(n, e):
                y = y + w[j] * ((F.silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e])
        ys.append(y)
        ids.append(e_n)
    # HF's load_balancing_loss_func: top-k assignment fractions (summing to k), no 1/k.
    f = torch.tensor(counts, dtype=x.dtype) / N
    lb = E * sum(f[e] * probs[:, e].mean() for e in range(E))
    z = sum(torch.logsumexp(logits[n], 0) ** 2 for n in range(N)) / N
    return torch.stack(ys), lb, z, torch.stack(ids)


def loss_of(y, aux, g):
    return (y * g).sum() + sum(aux)


def params(moe):
    return [moe.router.gate.weight, moe.experts.w1, moe.experts.w3, moe.experts.w2]


def check_against_reference(moe: MoE, B: int, T: int, dtype, tol: float, keep_rule=None):
    C = moe.dim
    x = torch.randn(B, T, C, dtype=dtype, requires_grad=True)
    g = torch.randn(B, T, C, dtype=dtype)
    y = moe(x)
    aux = collect_aux_losses(moe)
    loss_of(y, aux.values(), g).backward()

    ref = [p.detach().double().requires_grad_() for p in params(moe)]
    x_ref = x.detach().double().requires_grad_()
    keep = keep_rule(moe, x_ref.view(-1, C)) if keep_rule else None
    y_ref, lb, z, _ = dense_reference(x_ref.view(-1, C), *ref, moe.cfg, keep=keep)
    aux_ref = [moe.cfg.load_balance_coef * lb, moe.cfg.z_loss_coef * z]
    loss_of(y_ref.view(B, T, C), aux_ref, g.double()).backward()

    assert rel_rms(y, y_ref.view(B, T, C)) < tol
    assert abs(aux["load_balance"].item() - aux_ref[0].item()) < tol * aux_ref[0].item()
    assert abs(aux["z_loss"].item() - aux_ref[1].item()) < tol * aux_ref[1].item()
    assert rel_rms(x.grad, x_ref.grad) < tol
    for p, r in zip(params(moe), ref):
        assert rel_rms(p.grad, r.grad) < tol, p.shape


@pytest.mark.parametrize("topk_norm", ["none", "renormalize"])
@pytest.mark.parametrize("B,T", [(1, 37), (2, 50)])
def test_dropless_matches_dense_loop_float64(topk_norm, B, T):
    moe = make_moe(topk_norm=topk_norm)
    check_against_reference(moe, B, T, torch.float64, tol=1e-10)


def test_dropless_float32_grouped_mm_path():
    # Widths that are multiples of 4 floats: torch._grouped_mm may run (it is used when it can).
    moe = make_moe(dim=24, hidden=40, dtype=torch.float32)
    check_against_reference(moe, 1, 63, torch.float32, tol=1e-5)


def test_expert_forward_grouped_mm_equals_loop():
    E, C, H = 5, 16, 24
    counts = torch.tensor([7, 0, 12, 3, 15])
    x = torch.randn(int(counts.sum()), C)
    w1, w3, w2 = torch.randn(E, C, H), torch.randn(E, C, H), torch.randn(E, H, C)
    ws = [w.requires_grad_() for w in (w1, w3, w2)]
    loop = expert_forward(x, counts, *ws, grouped_mm=False)
    grads_loop = torch.autograd.grad(loop.sum(), ws)
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing in this torch")
    grouped = expert_forward(x, counts, *ws, grouped_mm=True)
    # .sum() hands an expanded (stride-0) gradient to the grouped GEMM backward.
    grads_grouped = torch.autograd.grad(grouped.sum(), ws)
    assert rel_rms(grouped, loop) < 1e-6
    for a, b in zip(grads_grouped, grads_loop):
        assert rel_rms(a, b) < 1e-6
    with pytest.raises(ValueError, match="grouped_mm"):
        expert_forward(x.double(), counts, *(w.double() for w in ws), grouped_mm=True)
    with pytest.raises(ValueError, match="counts"):
        expert_forward(x, counts[:4], *ws)


def test_sort_tokens_by_expert_is_stable_and_counts():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    order, counts = sort_tokens_by_expert(ids, 4)
    assert counts.tolist() == [3, 2, 3, 0]
    # expert 0: flat 1 (token 0), 2 (token 1), 6 (token 3); expert 1: 3, 5; expert 2: 0, 4, 7
    assert order.tolist() == [1, 2, 6, 3, 5, 0, 4, 7]


def test_load_balance_and_z_loss_hand_computed():
    # 2 experts, 3 tokens; logits chosen so the softmax is exact:
    # token 0: [0, ln 3] -> p = [1/4, 3/4]; token 1: [ln 3, 0] -> [3/4, 1/4]; token 2: [ln 4, 0] -> [4/5, 1/5]
    L = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0], [math.log(4), 0.0]], dtype=torch.float64)
    # Top-1 picks experts 1, 0, 0: f = [2/3, 1/3]; full-softmax means P = [(1/4+3/4+4/5)/3, (3/4+1/4+1/5)/3]
    # = [0.6, 0.4]; loss = E * sum f P = 2 * (2/3 * 0.6 + 1/3 * 0.4) = 16/15.
    # (The top-k-only bug would use P = [(0+3/4+4/5)/3, (3/4+0+0)/3] and give 2 * 0.5 = 1.0.)
    expected_lb = 16 / 15
    # logsumexp per token: ln 4, ln 4, ln 5.
    expected_z = (2 * math.log(4) ** 2 + math.log(5) ** 2) / 3

    cfg = MoEConfig(n_experts=2, top_k=1, load_balance_coef=1e-3, z_loss_coef=1e-2)
    moe = MoE(3, 4, cfg).double()
    moe.init_weights()
    with torch.no_grad():
        moe.router.gate.weight.copy_(L.t())  # x = identity rows -> logits = L
    moe(torch.eye(3, dtype=torch.float64)[None])
    assert moe.metrics["load_balance"] == pytest.approx(expected_lb, rel=1e-12)
    assert moe.metrics["z_loss"] == pytest.approx(expected_z, rel=1e-12)
    assert pooled_load_balance([moe]).item() == pytest.approx(1e-3 * expected_lb, rel=1e-12)
    assert moe.aux_losses["z_loss"].item() == pytest.approx(1e-2 * expected_z, rel=1e-12)
    assert moe.metrics["expert_load"] == pytest.approx([2 / 3, 1 / 3])

    # Top-2 of 2 experts: f = [1, 1] (fractions sum to k = 2, HF's scale), loss = 2 * (0.6 + 0.4) = 2.
    stats = balance_stats(L.softmax(-1), torch.tensor([[1, 0], [0, 1], [0, 1]]), 2)
    assert load_balancing_loss(stats).item() == pytest.approx(2.0, rel=1e-12)
    assert (stats.counts / stats.rows).tolist() == [1.0, 1.0]
    assert router_z_loss(L).item() == pytest.approx(expected_z, rel=1e-12)


def test_load_balance_gradient_flows_through_probabilities_only():
    logits = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    ids = logits.detach().topk(2, -1).indices
    stats = balance_stats(logits.softmax(-1), ids, 4)
    load_balancing_loss(stats).backward()
    # d/dlogits of E * sum_e f_e * mean_n p_ne with f fixed, by the softmax Jacobian.
    p = logits.detach().softmax(-1)
    dp = 4 * (stats.counts / 9) / 9  # [E], same for every token
    expected = p * (dp - (p * dp).sum(-1, keepdim=True))
    assert torch.allclose(logits.grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("topk_norm", ["none", "renormalize", "l1"])
def test_topk_norm_modes(topk_norm):
    router = TopKRouter(4, 4, 2, topk_norm).double()
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4, dtype=torch.float64))
    # softmax of log([0.1, 0.2, 0.3, 0.4]) is the probabilities themselves.
    x = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
    out = router(x)
    assert out.expert_ids.tolist() == [[3, 2]]
    expected = [0.4, 0.3] if topk_norm == "none" else [4 / 7, 3 / 7]
    assert out.weights[0].tolist() == pytest.approx(expected, rel=1e-12)
    assert out.probs.sum().item() == pytest.approx(1.0)


def test_router_runs_in_float32_for_bf16_inputs():
    router = TopKRouter(8, 5, 2)
    router.init_weights()
    router.to(torch.bfloat16)
    out = router(torch.randn(11, 8, dtype=torch.bfloat16))
    assert out.logits.dtype == out.probs.dtype == out.weights.dtype == torch.float32


def first_come_keep_rule(moe: MoE, x: torch.Tensor):
    """The documented capacity rule, written as a loop: per expert, the first `cap` tokens in order."""
    cfg = moe.cfg
    N = x.shape[0]
    cap = math.ceil(cfg.capacity_factor * N * cfg.top_k / cfg.n_experts)
    ids = (x @ moe.router.gate.weight.detach().double().t()).softmax(-1).topk(cfg.top_k).indices
    seen, kept = [0] * cfg.n_experts, set()
    for n in range(N):
        for e in ids[n].tolist():
            if seen[e] < cap:
                kept.add((n, e))
            seen[e] += 1
    moe._expected_dropped = N * cfg.top_k - len(kept)
    return lambda n, e: (n, e) in kept


@pytest.mark.parametrize("capacity_factor", [0.6, 1.0])
def test_capacity_drops_exactly_the_documented_assignments(capacity_factor):
    moe = make_moe(n_experts=5, top_k=2, capacity_factor=capacity_factor)
    check_against_reference(moe, 1, 37, torch.float64, tol=1e-10, keep_rule=first_come_keep_rule)
    assert moe.metrics["dropped_tokens"] == moe._expected_dropped
    assert moe._expected_dropped > 0


def test_large_capacity_drops_nothing_and_equals_dropless():
    moe = make_moe(n_experts=5, top_k=2, capacity_factor=2.5)  # cap = N * k / E * 2.5 >= N
    x = torch.randn(1, 37, 20, dtype=torch.float64)
    y_cap = moe(x)
    assert moe.metrics["dropped_tokens"] == 0
    moe.cfg.capacity_factor = 0.0
    assert torch.equal(moe(x), y_cap)


def test_apply_capacity_counts():
    # expert 0 gets tokens 0, 1, 2, 3 (drops 2, 3); expert 1 gets 0, 2, 3 (drops 3); expert 2 gets 1
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    order, counts = sort_tokens_by_expert(ids, 3)
    kept, kept_counts, dropped = apply_capacity(order, counts, 2)
    assert kept_counts.tolist() == [2, 2, 1]
    assert int(dropped) == 3
    # expert 0 keeps tokens 0, 1 (flat 0, 2); expert 1 keeps tokens 0, 2 (flat 1, 5); expert 2: flat 3
    assert kept.tolist() == [0, 2, 1, 5, 3]
    assert expert_capacity(37, 2, 5, 0.6) == 9  # ceil(8.88)
    assert expert_capacity(10, 1, 10, 1.1) == 2  # 1.1 exactly, not float noise
    assert expert_capacity(12, 1, 4, 1.0) == 3


def test_metrics_sum_to_one_and_are_plain_python():
    moe = make_moe(n_experts=7, top_k=3, dtype=torch.float32)
    moe(torch.randn(2, 33, 20))
    m = moe.metrics
    assert len(m["expert_load"]) == 7
    assert sum(m["expert_load"]) == pytest.approx(1.0, abs=1e-6)
    assert all(isinstance(v, float) for v in m["expert_load"])
    assert isinstance(m["load_balance"], float) and isinstance(m["z_loss"], float)
    assert isinstance(m["dropped_tokens"], int) and m["dropped_tokens"] == 0
    assert m["load_balance"] == pytest.approx(pooled_load_balance([moe]).item() / moe.cfg.load_balance_coef)


def test_bad_config_raises_clear_errors():
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and moe.n_experts=4"):
        MoE(8, 8, MoEConfig(n_experts=4, top_k=5))
    with pytest.raises(ValueError, match="topk_norm='softmax' is unknown"):
        MoE(8, 8, MoEConfig(topk_norm="softmax"))
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(8, 8, MoEConfig(capacity_factor=-1.0))
    with pytest.raises(ValueError, match="hidden"):
        MoE(8, 0, MoEConfig())
    moe = make_moe()
    with pytest.raises(ValueError, match=r"\[B, T, 20\]"):
        moe(torch.randn(5, 20, dtype=torch.float64))


def test_expert_hidden_overrides_and_meta_build():
    with torch.device("meta"):
        moe = MoE(16, 64, MoEConfig(n_experts=4, top_k=2, expert_hidden=24))
    assert moe.experts.w1.shape == (4, 16, 24) and moe.experts.w2.shape == (4, 24, 16)
    assert moe.experts.w1.is_meta
    moe.to_empty(device="cpu")
    moe.init_weights(out_std=0.001)
    assert moe.experts.w2.std().item() < 0.002 < moe.experts.w1.std().item()
    assert moe.flops_per_token() == 6.0 * (16 * 4 + 2 * 3 * 16 * 24)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_matches_megatron_core_routing_and_losses():
    """megatron-core 0.16.1's moe_utils run unpatched on CPU; their losses and routing equal ours."""
    mu = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    N, E, k, cf = 37, 6, 3, 0.7
    for topk_norm, pre_softmax in (("none", True), ("renormalize", False)):
        moe = make_moe(dim=20, n_experts=E, top_k=k, topk_norm=topk_norm, capacity_factor=cf,
                       load_balance_coef=1e-3, z_loss_coef=1e-3, dtype=torch.float32)
        x = torch.randn(1, N, 20)
        moe(x)
        r = moe.router(x.view(N, 20))
        # Jamba's raw top-k probabilities are Megatron's pre-softmax routing; Mixtral's
        # renormalised ones are its default (top-k of logits, softmax over the k).
        probs, routing_map = mu.topk_routing_with_score_function(r.logits, k, use_pre_softmax=pre_softmax)
        ours = torch.zeros(N, E).scatter(1, r.expert_ids, r.weights)
        assert torch.allclose(probs, ours, rtol=1e-6, atol=1e-7)

        aux_map, scores = mu.compute_routing_scores_for_aux_loss(r.logits, k, "softmax")
        lb = mu.switch_load_balancing_loss_func(scores, aux_map.sum(0), N, k, E, 1e-3)
        z = mu.z_loss_func(r.logits, 1e-3)
        # Megatron divides the assignment fractions by k (HF, and so we, do not): ours is k times it.
        assert pooled_load_balance([moe]).item() == pytest.approx(k * lb.item(), rel=1e-5)
        assert moe.aux_losses["z_loss"].item() == pytest.approx(z.item(), rel=1e-5)

        # Capacity: same per-expert limit and the same kept count per expert. Which assignments
        # Megatron keeps under drop_policy="position" is left to torch.topk's tie-breaking among
        # equal mask values (on CPU it did not keep the first positions), so only counts compare.
        assert mu.get_capacity(N * k, E, cf) == expert_capacity(N, k, E, cf)
        _, kept_map = mu.apply_router_token_dropping(probs, routing_map, k, cf, drop_policy="position")
        order, counts = sort_tokens_by_expert(r.expert_ids, E)
        _, kept_counts, dropped = apply_capacity(order, counts, expert_capacity(N, k, E, cf))
        assert kept_map.sum(0).tolist() == kept_counts.tolist()
        assert moe.metrics["dropped_tokens"] == int(dropped) == N * k - int(kept_map.sum()) > 0
