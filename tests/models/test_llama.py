"""Llama baseline: parity with Hugging Face LlamaForCausalLM, export, meta build, FLOP count.

Tolerances (relative RMS unless stated). Float64 parity with Hugging Face is limited by
Hugging Face itself, which runs RMSNorm, the RoPE angles, the eager softmax and the loss in
float32 even in a float64 model (measured differences about 1e-6):
  logits 1e-5, loss 1e-5 absolute, every weight gradient 1e-5.
Exported checkpoints reloaded by `from_pretrained` run in float32: logits atol 1e-5 + rtol 1e-5.
Loading a Hugging Face state dict into ours is a renaming: weights must be bitwise equal.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from testutil.kernel_util import rel_rms
from titanforge.models.common import rope_frequencies
from titanforge.models.config import ModelConfig
from titanforge.models.llama.hf import (
    export_hf,
    from_hf_state_dict,
    hf_config,
    model_config_from_hf,
    to_hf_state_dict,
)
from titanforge.models.registry import build_model

transformers = pytest.importorskip("transformers")

PARITY_TOL = 1e-5
V = 37


def tiny_cfg(tie: bool, **kw) -> ModelConfig:
    # GQA 6 query heads over 2 key/value heads, head dim 4, FFN width not a power of two.
    base = dict(family="llama", vocab_size=V, d_model=24, n_layers=2, n_heads=6, n_kv_heads=2,
                ffn_hidden=40, max_seq_len=128, rope_theta=500.0, tie_embeddings=tie, init_std=0.3)
    return ModelConfig(**(base | kw))


def tiny_llama(tie: bool, dtype=torch.float64):
    model = build_model(tiny_cfg(tie)).to(dtype)
    # Non-unit norm gains, so a norm mapped to the wrong place cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def hf_twin(model, attn="eager"):
    hf = transformers.LlamaForCausalLM(hf_config(model.cfg, attn_implementation=attn))
    hf = hf.to(next(model.parameters()).dtype)
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    return hf


def lm_loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@pytest.mark.parametrize("tie", [True, False])
def test_logits_loss_and_grads_match_hugging_face(tie):
    model = tiny_llama(tie)
    hf = hf_twin(model)
    assert hf.config.tie_word_embeddings == tie
    tokens = torch.randint(0, V, (2, 63))
    logits = model(tokens)
    out = hf(input_ids=tokens, labels=tokens)
    assert logits.dtype == out.logits.dtype == torch.float64
    assert rel_rms(logits, out.logits) < PARITY_TOL

    loss = lm_loss(logits, tokens)
    assert abs(loss.item() - out.loss.item()) < PARITY_TOL
    loss.backward()
    out.loss.backward()
    # Our gradients under Hugging Face names: a copy of the model whose weights are the gradients.
    grad_model = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(model.parameters(), grad_model.parameters()):
            q.copy_(p.grad)
    ours = to_hf_state_dict(grad_model)
    theirs = dict(hf.named_parameters())
    assert len(theirs) == len(list(model.parameters()))
    for name, p in theirs.items():
        assert rel_rms(ours[name], p.grad) < PARITY_TOL, name


def test_parity_check_detects_a_swapped_weight():
    # The tolerance above must be able to fail: swapping gate and up projections of one layer
    # (same shapes) moves the logits far outside it.
    model = tiny_llama(tie=False)
    hf = hf_twin(model)
    with torch.no_grad():
        mlp = hf.model.layers[1].mlp
        gate = mlp.gate_proj.weight.clone()
        mlp.gate_proj.weight.copy_(mlp.up_proj.weight)
        mlp.up_proj.weight.copy_(gate)
    tokens = torch.randint(0, V, (1, 30))
    assert rel_rms(model(tokens), hf(tokens).logits) > 1e3 * PARITY_TOL


def test_sdpa_attention_matches_too():
    model = tiny_llama(tie=True)
    tokens = torch.randint(0, V, (2, 50))
    assert rel_rms(model(tokens), hf_twin(model, attn="sdpa")(tokens).logits) < PARITY_TOL


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_with_from_pretrained(tie, tmp_path):
    model = tiny_llama(tie, dtype=torch.float32)
    out = export_hf(model, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf = transformers.LlamaForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.float32
    assert hf.config.tie_word_embeddings == tie
    assert hf.config.num_key_value_heads == 2 and hf.config.intermediate_size == 40
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, V, (2, 47))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_from_hf_state_dict_round_trip(tie):
    model = tiny_llama(tie, dtype=torch.float32)
    hf = hf_twin(model)
    back = from_hf_state_dict(model.cfg, hf.state_dict())
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    tokens = torch.randint(0, V, (1, 40))
    assert torch.equal(back(tokens), model(tokens))
    # Hugging Face omits a tied lm_head when it saves; loading must not need it.
    if tie:
        sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        assert torch.equal(from_hf_state_dict(model.cfg, sd)(tokens), model(tokens))


def test_config_round_trip():
    for tie in (True, False):
        cfg = tiny_cfg(tie)
        assert model_config_from_hf(hf_config(cfg)) == cfg
        assert model_config_from_hf(hf_config(cfg).to_dict()) == cfg


def test_bad_inputs_raise_clear_errors():
    model = tiny_llama(tie=True, dtype=torch.float32)
    sd = transformers.LlamaForCausalLM(hf_config(tiny_cfg(tie=False))).state_dict()
    with pytest.raises(ValueError, match="tie_embeddings=False"):
        from_hf_state_dict(tiny_cfg(tie=True), sd)
    with pytest.raises(ValueError, match="shape"):
        from_hf_state_dict(tiny_cfg(tie=False, ffn_hidden=48), sd)
    with pytest.raises(ValueError, match="not part of"):
        from_hf_state_dict(tiny_cfg(tie=False), sd | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(24)})
    with pytest.raises(ValueError, match="family='llama'"):
        hf_config(tiny_cfg(tie=True, family="ttt"))
    with pytest.raises(ValueError, match="rope_type"):
        model_config_from_hf(hf_config(tiny_cfg(tie=True), rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                             "rope_theta": 500.0}))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 129, dtype=torch.long))
    meta = build_model(tiny_cfg(tie=True), device="meta")
    with pytest.raises(ValueError, match="meta-device"):
        export_hf(meta, "/nonexistent/never-written")


@pytest.mark.parametrize("tie", [True, False])
def test_meta_build_then_init_gives_finite_outputs(tie):
    cfg = tiny_cfg(tie)
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    # to_empty leaves garbage in the non-persistent RoPE buffer; init_weights must rebuild it.
    assert torch.equal(model.freqs, rope_frequencies(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta))
    assert all(torch.equal(model.layers[str(i)].ffn_norm.weight, torch.ones(cfg.d_model)) for i in range(2))
    logits = model(torch.randint(0, V, (2, 33)))
    assert logits.shape == (2, 33, V) and torch.isfinite(logits).all()


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_hand_count(tie):
    model = build_model(tiny_cfg(tie))
    C, L, G, D, Fh, T = 24, 2, 2, 4, 40, 50
    attn_weights = C * C + 2 * C * G * D + C * C  # wq, wk, wv, wo
    ffn_weights = 3 * C * Fh  # w1, w3, w2
    norms = 2 * C
    head = V * C  # tied or not, the LM head is a V x C matmul per token
    n = L * (attn_weights + ffn_weights + norms) + C + head
    # Attention: QK^T and AV, 2 flops per multiply-add, T/2 keys per causal query, fwd + 2x bwd.
    attn = L * 3 * (2 * 2 * C * T / 2)
    assert model.flops_per_token(T) == 6 * n + attn
