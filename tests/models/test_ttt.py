"""TTT models: the layer against the primal reference op, causality, carried state, presets."""

from pathlib import Path

import pytest
import torch

from testutil.kernel_util import rel_rms
from titanforge.kernels.ttt import naive_ttt_linear, naive_ttt_mlp
from titanforge.models.config import ModelConfig
from titanforge.models.registry import build_model
from titanforge.models.ttt import layer as ttt_layer
from titanforge.models.ttt.config import TTTConfig
from titanforge.models.ttt.layer import TTTLayer

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = [(inner, backbone) for inner in ("linear", "mlp") for backbone in ("mamba", "transformer")]



def tiny_cfg(inner: str, backbone: str, **ttt) -> ModelConfig:
    return ModelConfig(family="ttt", vocab_size=61, d_model=36, n_layers=2, n_heads=3, ffn_hidden=40,
                       ttt=TTTConfig(inner=inner, backbone=backbone, **{"mini_batch_size": 8, **ttt}))


def perturbed_layer(inner: str, backbone: str) -> TTTLayer:
    """A float64 layer whose zero/one-initialised parameters are randomised, so every gradient
    path (biases, LN, per-position offsets) is exercised."""
    layer = TTTLayer(36, 3, TTTConfig(inner=inner, backbone=backbone, mini_batch_size=8))
    layer.init_weights()
    layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        layer.lr_weight.mul_(10)  # spread sigmoid(theta_lr x) away from 1/2
    return layer


@pytest.mark.parametrize("inner,backbone", VARIANTS)
def test_layer_dual_form_matches_primal_reference(inner, backbone, monkeypatch):
    layer = perturbed_layer(inner, backbone)
    x = torch.randn(2, 29, 36, dtype=torch.float64)
    cot = torch.randn(2, 29, 36, dtype=torch.float64)

    def run():
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y, _ = layer(xi)
        (y * cot).sum().backward()
        return y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    y, gx, grads = run()
    monkeypatch.setattr(ttt_layer, "chunk_ttt_linear", naive_ttt_linear)
    monkeypatch.setattr(ttt_layer, "chunk_ttt_mlp", naive_ttt_mlp)
    y_ref, gx_ref, grads_ref = run()
    assert rel_rms(y, y_ref) < 1e-10
    assert rel_rms(gx, gx_ref) < 1e-9
    for name in grads_ref:
        assert rel_rms(grads[name], grads_ref[name]) < 1e-8, name
        assert grads_ref[name].abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("inner,backbone", VARIANTS)
def test_model_is_causal(inner, backbone):
    model = build_model(tiny_cfg(inner, backbone))
    tokens = torch.randint(0, 61, (2, 37))
    t = 21  # inside the third mini-batch of 8
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % 61
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax() > 1e-4


@pytest.mark.parametrize("inner,backbone", VARIANTS)
def test_model_pieces_with_carried_state_equal_one_pass(inner, backbone):
    model = build_model(tiny_cfg(inner, backbone))
    tokens = torch.randint(0, 61, (2, 43))
    with torch.no_grad():
        whole, final = model(tokens, return_final_states=True)
        first, mid = model(tokens[:, :16], return_final_states=True)
        second, final2 = model(tokens[:, 16:], initial_states=mid, return_final_states=True)
    assert rel_rms(torch.cat([first, second], 1), whole) < 1e-6
    for name in final:
        for a, b in zip(final[name]["ttt"]["inner"], final2[name]["ttt"]["inner"]):
            assert rel_rms(b, a) < 1e-6


@pytest.mark.parametrize("inner,backbone", VARIANTS)
def test_meta_build_contract(inner, backbone):
    cfg = tiny_cfg(inner, backbone)
    model = build_model(cfg, device="meta")
    assert list(model.layers.keys()) == ["0", "1"]
    model.to_empty(device="cpu")
    model.init_weights()
    logits = model(torch.randint(0, 61, (1, 11)))
    assert logits.shape == (1, 11, 61) and torch.isfinite(logits).all()
    assert model.flops_per_token(64) > 6 * sum(p.numel() for p in model.layers.parameters())


def test_bad_config_raises():
    with pytest.raises(ValueError, match="model.ttt.inner"):
        build_model(tiny_cfg("rnn", "mamba"))
    with pytest.raises(ValueError, match="mini_batch_size"):
        build_model(tiny_cfg("linear", "transformer", mini_batch_size=0))
    with pytest.raises(ValueError, match="even head dim"):
        build_model(ModelConfig(family="ttt", vocab_size=61, d_model=21, n_heads=3, n_layers=1))


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_presets_exist_and_build(inner):
    from titanforge.launch.config import load_config

    job = load_config(ROOT / "configs" / f"ttt-{inner}-tiny.yaml")
    assert job.model.family == "ttt" and job.model.ttt.inner == inner
    assert job.model.ttt.eta_base == (1.0 if inner == "linear" else 0.1)
    model = build_model(job.model, device="meta")
    assert len(model.layers) == job.model.n_layers


def test_loss_falls_on_a_repeated_pattern():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("linear", "mamba"))
    pattern = torch.randint(0, 61, (12,))
    tokens = pattern.repeat(2, 4)  # [2, 48]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
