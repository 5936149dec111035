"""SVF (Transformer²): the decomposition reproduces W, an SVF model at z = 1 is the base model,
gradients reach z only and equal a direct computation, mixing and CEM do what they say."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from fsdp_cases import build, global_batch, loss_fn  # noqa: E402

from titanforge.models.svf import SVFConfig, SVFLinear, apply_svf, load_z, mix_z, svf_modules, z_state_dict
from titanforge.trainer.svf import (adapt_few_shot, base_policy, cem_search, classify_task, prepare_svf, read_z,
                                    reinforce_loss, save_z)

FAMILIES = ("llama", "titans", "titans-mag", "titans-mal", "titans-lmm", "ttt", "ttt-mlp", "jamba")


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (6, 6)])
def test_z_one_reproduces_the_matrix(shape):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=True).double()
    svf = SVFLinear.from_linear(lin)
    assert svf.z.numel() == min(shape)
    torch.testing.assert_close(svf.weight, lin.weight, rtol=1e-12, atol=1e-12)
    x = torch.randn(3, 4, shape[1], dtype=torch.float64)
    torch.testing.assert_close(svf(x), lin(x), rtol=1e-12, atol=1e-12)


def test_z_rescales_the_singular_values():
    """W' = U diag(s * z) V^T: its singular values are s * z (z > 0), its singular vectors W's."""
    torch.manual_seed(1)
    lin = nn.Linear(6, 9, bias=False).double()
    svf = SVFLinear.from_linear(lin)
    z = torch.rand(6, dtype=torch.float64) + 0.5
    with torch.no_grad():
        svf.z.copy_(z)
    s_new = torch.linalg.svdvals(svf.weight)
    torch.testing.assert_close(s_new.sort().values, (torch.linalg.svdvals(lin.weight) * z).sort().values)
    # A different z changes the output: the test can fail.
    assert not torch.allclose(svf.weight, lin.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_svf_model_at_z_one_equals_base_and_only_z_learns(family):
    torch.set_default_dtype(torch.float64)
    try:
        base = build(family).double()
        model = build(family).double()
        names = apply_svf(model)
        assert names and all(n.startswith("layers.") for n in names)
        inputs, targets = global_batch()
        inputs, targets = inputs[:2], targets[:2]
        with torch.no_grad():
            torch.testing.assert_close(model(inputs), base(inputs), rtol=1e-9, atol=1e-9)
        loss = loss_fn(model, inputs, targets)
        loss.backward()
        for n, p in model.named_parameters():
            if n.endswith(".z"):
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
            else:
                assert not p.requires_grad and p.grad is None, n
    finally:
        torch.set_default_dtype(torch.float32)


def test_z_gradient_equals_direct_formula():
    """dL/dz_i = s_i * u_i^T (dL/dW') v_i, computed independently of the module."""
    torch.manual_seed(2)
    lin = nn.Linear(5, 7).double()
    svf = SVFLinear.from_linear(lin)
    x = torch.randn(11, 5, dtype=torch.float64)
    y = torch.randn(11, 7, dtype=torch.float64)
    with torch.no_grad():
        svf.z.copy_(torch.linspace(0.5, 1.5, 5, dtype=torch.float64))
    ((svf(x) - y) ** 2).sum().backward()
    W = svf.weight.detach().requires_grad_(True)
    ((F.linear(x, W, lin.bias.detach()) - y) ** 2).sum().backward()
    U, s, Vh = svf.U.detach(), svf.s.detach(), svf.Vh.detach()
    direct = torch.stack([s[i] * U[:, i] @ W.grad @ Vh[i] for i in range(5)])
    torch.testing.assert_close(svf.z.grad, direct, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: F.linear(x, (U * (s * z)) @ Vh), (svf.z.detach().clone().requires_grad_(),))


def test_z_files_round_trip_and_mixing(tmp_path):
    model = build("llama")
    apply_svf(model)
    zs = z_state_dict(model)
    a = {n: torch.full_like(z, 2.0) for n, z in zs.items()}
    b = {n: torch.full_like(z, -1.0) for n, z in zs.items()}
    mixed = mix_z([a, b], [0.25, 0.5])
    assert all(torch.allclose(z, torch.full_like(z, 0.0)) for z in mixed.values())
    save_z(tmp_path / "e.safetensors", a, {"task": "passkey"})
    load_z(model, read_z(tmp_path / "e.safetensors"))
    assert all(torch.equal(m.z.detach(), torch.full_like(m.z, 2.0)) for m in svf_modules(model).values())
    with pytest.raises(ValueError, match="missing"):
        load_z(model, {k: v for k, v in list(a.items())[1:]})
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a z-vector file"):
        read_z(tmp_path / "bad.safetensors")


def test_targets_that_match_nothing_are_named():
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_svf(build("llama"), SVFConfig(targets=["nothing.*"]))


def test_svd_cache_is_written_reused_and_checked(tmp_path):
    m1 = build("llama")
    names = prepare_svf(m1, SVFConfig(), tmp_path)
    files = list(tmp_path.glob("svd-*/index.json"))
    assert len(files) == 1
    m2 = build("llama")
    assert prepare_svf(m2, SVFConfig(), tmp_path) == names
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    # Other base weights (another seed) must not silently reuse the cache.
    with pytest.raises(ValueError, match="does not reproduce"):
        prepare_svf(build("llama", seed=5), SVFConfig(), tmp_path)


def test_base_policy_restores_z_and_reinforce_moves_toward_reward():
    torch.manual_seed(0)
    model = build("llama")
    apply_svf(model)
    with torch.no_grad():
        for m in svf_modules(model).values():
            m.z.mul_(1.1)
    before = z_state_dict(model)
    with base_policy(model):
        assert all(torch.equal(m.z, torch.ones_like(m.z)) for m in svf_modules(model).values())
    assert all(torch.equal(before[n], z) for n, z in z_state_dict(model).items())
    prompt, target = torch.randint(0, 97, (4, 9)), torch.randint(0, 97, (4, 2))
    # A sample equal to the target gets reward +1: the gradient step raises its log-probability.
    loss, info = reinforce_loss(model, prompt, target, target, kl_coef=0.0, sample=target)
    assert info["reward"] == 1.0
    seq = torch.cat([prompt, target], 1)

    def logp():
        lp = F.log_softmax(model(seq[:, :-1])[:, 8:].float(), -1)
        return lp.gather(-1, target.unsqueeze(-1)).sum().item()

    lp0 = logp()
    loss.backward()
    with torch.no_grad():
        for m in svf_modules(model).values():
            m.z -= 1e-2 * m.z.grad
    assert logp() > lp0
    # At z = base the KL term is zero; away from it, positive.
    _, info = reinforce_loss(model, prompt, target, target, kl_coef=1.0, sample=target)
    assert info["kl"] > 0


def test_cem_finds_the_known_best_mixture():
    best = torch.tensor([0.7, -0.2, 0.5], dtype=torch.float64)
    alpha = cem_search(lambda a: -float(((a - best) ** 2).sum()), k=3, iters=30, population=40, elite=8)
    assert torch.allclose(alpha, best, atol=2e-2), alpha
    # With too few iterations it does not get there: the test can fail.
    rough = cem_search(lambda a: -float(((a - best) ** 2).sum()), k=3, iters=1, population=4, elite=2)
    assert not torch.allclose(rough, best, atol=2e-2)


def test_lora_baseline_starts_at_base_and_trains_only_its_factors():
    from titanforge.models.lora import apply_lora
    torch.manual_seed(0)
    base, model = build("jamba"), build("jamba")
    apply_lora(model, rank=2)
    inputs, targets = global_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs[:2]), base(inputs[:2]))
    loss_fn(model, inputs[:2], targets[:2]).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.endswith(("lora_A", "lora_B")) for n in trained)
    with pytest.raises(ValueError, match="rank=0"):
        apply_lora(build("llama"), rank=0)


class _Lookup(nn.Module):
    """Logits = a fixed table row per input token, through one SVF-able linear layer."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)
        self.layers = nn.ModuleList([nn.Linear(vocab, vocab, bias=False)])

    def forward(self, tokens):
        return self.layers[0](self.emb(tokens))


def test_classify_task_reads_the_marked_position_among_the_tags():
    torch.manual_seed(0)
    m = _Lookup(7)
    tags = [5, 2, 6]
    tokens = torch.randint(0, 7, (6, 9))
    mask = torch.zeros(6, 8, dtype=torch.bool)
    at = torch.tensor([0, 3, 7, 2, 5, 1])
    mask[torch.arange(6), at] = True
    got = classify_task(m, tokens, mask, tags)
    logits = m(tokens[:, :-1])
    want = torch.stack([logits[b, at[b], tags].argmax() for b in range(6)])
    assert torch.equal(got, want) and got.max() < len(tags)
    with pytest.raises(ValueError, match="exactly one position"):
        classify_task(m, tokens, torch.ones(6, 8, dtype=torch.bool), tags)


def test_few_shot_finds_the_mixture_of_experts_that_fits_and_restores_z():
    torch.manual_seed(0)
    m = _Lookup(6)
    apply_svf(m)
    experts = [{n: torch.rand_like(z) + 0.5 for n, z in z_state_dict(m).items()} for _ in range(3)]
    target = mix_z(experts, [0.7, -0.2, 0.5])
    x = torch.arange(6)[None]
    load_z(m, target)
    with torch.no_grad():
        want = m(x)
    load_z(m, {n: torch.ones_like(z) for n, z in target.items()})
    alpha = adapt_few_shot(m, experts, lambda mod: -float((mod(x) - want).pow(2).mean()), iters=30,
                           population=40, elite=8)
    torch.testing.assert_close(alpha, torch.tensor([0.7, -0.2, 0.5], dtype=torch.float64), atol=0.05, rtol=0)
    assert all(torch.equal(z, torch.ones_like(z)) for z in z_state_dict(m).values()), "z not restored"
