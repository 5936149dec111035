"""Jamba model: same logits, loss and gradients as Hugging Face `JambaForCausalLM` loaded with our
weights (HF's sequential or mamba.py scan is the slow reference); export/import round trip;
causality; meta-device build; clear errors."""

import pytest
import torch
import torch.nn.functional as F

from testutil.kernel_util import rel_rms
from titanforge.models.common.moe import MoEConfig
from titanforge.models.config import ModelConfig
from titanforge.models.jamba.config import JambaConfig
from titanforge.models.jamba.hf import export_hf, from_hf, to_hf
from titanforge.models.registry import build_model, collect_aux_losses

transformers = pytest.importorskip("transformers")


def tiny(pattern, n_layers, **kw):
    # Expert width a multiple of 16: HF's CPU grouped matmul needs 16-byte row strides.
    moe = MoEConfig(n_experts=6, top_k=2, topk_norm="none", load_balance_coef=1e-2, z_loss_coef=0.0)
    base = dict(family="jamba", vocab_size=97, d_model=40, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                ffn_hidden=48, norm_eps=1e-6, tie_embeddings=False,
                jamba=JambaConfig(layer_pattern=pattern, d_state=6, chunk_size=16, mamba2_headdim=16, moe=moe))
    base.update(kw)
    return ModelConfig(**base)


def randomized(cfg):
    model = build_model(cfg)
    with torch.no_grad():
        # Larger than init scale so every branch (gates, routing, decays) matters to the logits.
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_proj.bias")):
                continue
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.1))
    return model


def hf_twin(model):
    config, sd = to_hf(model)
    config._attn_implementation = "eager"
    hf = transformers.JambaForCausalLM(config)
    hf.load_state_dict(sd, strict=True)
    return hf


def test_logits_and_gradients_match_hf():
    # Attention at 2 of 6, MoE on odd layers: three MoE layers, one attention layer.
    model = randomized(tiny("MD ME AD ME MD ME", 6))
    hf = hf_twin(model)
    tokens = torch.randint(0, 97, (2, 45))
    logits = model(tokens)
    hf_logits = hf(tokens).logits
    assert rel_rms(logits, hf_logits) < 1e-5
    cot = torch.randn_like(logits)
    (logits * cot).sum().backward()
    (hf_logits * cot).sum().backward()
    _, ours_as_hf = to_hf_grads(model)
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    for k, g in ours_as_hf.items():
        assert rel_rms(g, hf_grads[k]) < 1e-4, k


def to_hf_grads(model):
    """Map our gradients with the same name mapping as the weights."""
    saved = {k: p.data for k, p in model.named_parameters()}
    for p in model.parameters():
        p.data = p.grad
    try:
        return to_hf(model)
    finally:
        for k, p in model.named_parameters():
            p.data = saved[k]


@pytest.mark.parametrize("top_k", [2, 4])
@pytest.mark.parametrize("pattern,n_moe", [("MD AE MD MD", 1), ("ME AD ME MD ME MD", 3)])
def test_loss_with_load_balancing_matches_hf(pattern, n_moe, top_k):
    """HF's load_balancing_loss_func pools the MoE layers and counts k assignments per token; ours is
    the same loss, so the aux loss and the total loss agree at the same coefficient."""
    cfg = tiny(pattern, len(pattern.split()))
    cfg.jamba.moe.top_k = top_k
    model = randomized(cfg)
    hf = hf_twin(model)
    assert hf.config.router_aux_loss_coef == cfg.jamba.moe.load_balance_coef
    tokens = torch.randint(0, 97, (2, 33))
    logits = model(tokens)
    aux = collect_aux_losses(model)
    assert len(aux) == n_moe + 1  # a z-loss per layer (coef 0 here), one pooled balance term
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 97), tokens[:, 1:].reshape(-1)) + sum(aux.values())
    hf_out = hf(tokens, labels=tokens, output_router_logits=True)
    assert len(hf_out.router_logits) == n_moe
    lb = aux["load_balance"] / cfg.jamba.moe.load_balance_coef
    assert lb.item() > 0
    assert abs(lb.item() - hf_out.aux_loss.item()) < 1e-5 * hf_out.aux_loss.item()
    assert abs(loss.item() - hf_out.loss.item()) < 1e-5 * hf_out.loss.item()
    # Gradients of the whole loss, the balance term's share of the routers' included.
    loss.backward()
    hf_out.loss.backward()
    _, ours_as_hf = to_hf_grads(model)
    for k, g in ours_as_hf.items():
        assert rel_rms(g, hf.get_parameter(k).grad) < 1e-4, k


def test_export_and_import_round_trip(tmp_path):
    model = randomized(tiny("MD ME AD ME", 4, tie_embeddings=True))
    export_hf(model, tmp_path)
    hf = transformers.JambaForCausalLM.from_pretrained(tmp_path)
    tokens = torch.randint(0, 97, (1, 30))
    assert rel_rms(hf(tokens).logits, model(tokens)) < 1e-5
    cfg, sd = from_hf(hf.config, hf.state_dict())
    assert (cfg.jamba.layer_pattern, cfg.d_model, cfg.kv_heads, cfg.tie_embeddings) == ("MD ME AD ME", 40, 2, True)
    assert cfg.jamba.moe.load_balance_coef == pytest.approx(1e-2)
    back = build_model(cfg)
    back.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_export_refuses_what_hf_cannot_express():
    with pytest.raises(ValueError, match="Mamba-2 or no feed-forward"):
        to_hf(build_model(tiny("SD ME", 2)))
    with pytest.raises(ValueError, match="i % period == offset"):
        to_hf(build_model(tiny("AD MD MD AD AD MD", 6)))


@pytest.mark.parametrize("pattern", ["MD ME AD ME", "SE AD"])
def test_causal(pattern):
    model = randomized(tiny(pattern, 4)).double()
    tokens = torch.randint(0, 97, (1, 40))
    base = model(tokens)
    changed = tokens.clone()
    changed[0, 25] = (changed[0, 25] + 1) % 97
    out = model(changed)
    assert torch.equal(out[:, :25], base[:, :25])
    assert not torch.allclose(out[:, 25:], base[:, 25:])


def test_meta_build_and_flops():
    cfg = tiny("MD ME AD ME", 8)
    model = build_model(cfg, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert set(model.layers) == {str(i) for i in range(8)}
    assert model.flops_per_token(2048) > model.flops_per_token(128) > 6 * cfg.vocab_size * cfg.d_model


def test_unsupported_mixer_is_a_clear_error():
    with pytest.raises(ValueError, match="mixer 'ttt'.*not supported"):
        build_model(tiny("MD TD", 2))
