"""Hugging Face interop for the Llama baseline: config and weight mapping, safetensors export.

Our `Llama` (models/llama/model.py) already uses Hugging Face's weight layout and its rotate-half
RoPE convention, so the mapping is a pure renaming: no q/k permutation is needed (that permutation
exists only between Meta's interleaved-pair checkpoints and Hugging Face's).

    ours                                   Hugging Face LlamaForCausalLM
    tok_embeddings.weight                  model.embed_tokens.weight
    layers.{i}.attention_norm.weight       model.layers.{i}.input_layernorm.weight
    layers.{i}.attention.w{q,k,v,o}.weight model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.ffn_norm.weight             model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.feed_forward.w1 / w3 / w2   model.layers.{i}.mlp.gate_proj / up_proj / down_proj
    norm.weight                            model.norm.weight
    output.weight (untied only)            lm_head.weight

`transformers` is a dev dependency, so it is imported only inside the functions that need it.
Known numerical difference: Hugging Face runs RMSNorm, the RoPE angles and the loss in float32
even for a float64 model; ours keeps float64 in RMSNorm and RoPE, so float64 logits agree to
about 1e-7 relative, not to 1e-15.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from titanforge.models.config import ModelConfig

# (our pattern, Hugging Face pattern); `{i}` is the layer index, kept as a string so a pipeline
# stage holding layers 4..7 exports names 4..7.
_LAYER_KEYS = (
    ("attention_norm.weight", "input_layernorm.weight"),
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
)
_TOP_KEYS = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)
_OURS_TO_HF = dict(_TOP_KEYS) | {f"layers.{{i}}.{a}": f"model.layers.{{i}}.{b}" for a, b in _LAYER_KEYS}
_HF_TO_OURS = {b: a for a, b in _OURS_TO_HF.items()}
_LAYER_RE = re.compile(r"^(model\.)?layers\.(\d+)\.(.+)$")


def _rename(name: str, table: dict[str, str]) -> str | None:
    m = _LAYER_RE.match(name)
    if m is None:
        return table.get(name)
    target = table.get(f"{m.group(1) or ''}layers.{{i}}.{m.group(3)}")
    return None if target is None else target.replace("{i}", m.group(2))


def hf_config(cfg: ModelConfig, **overrides) -> "transformers.LlamaConfig":  # noqa: F821
    """The `transformers.LlamaConfig` describing the same network as `cfg`.

    `overrides` go to LlamaConfig as is (e.g. bos_token_id / eos_token_id of your tokenizer; by
    default both are None because the model config does not know the tokenizer).
    """
    from transformers import LlamaConfig

    if cfg.family != "llama":
        raise ValueError(f"hf_config needs model.family='llama', got {cfg.family!r}; only the Llama "
                         f"baseline has a Hugging Face counterpart here")
    problems = cfg.validate()
    if problems:
        raise ValueError("cannot describe an invalid model config: " + "; ".join(problems))
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def model_config_from_hf(hf_cfg) -> ModelConfig:
    """Inverse of `hf_config`: our ModelConfig for a `transformers.LlamaConfig` (or its dict)."""
    get = hf_cfg.get if isinstance(hf_cfg, dict) else lambda k, d=None: getattr(hf_cfg, k, d)
    rope = get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope.get('rope_type')!r} is not supported; our Llama implements "
                         f"only the default (unscaled) rotary embedding")
    if get("attention_bias", False) or get("mlp_bias", False):
        raise ValueError("attention_bias / mlp_bias checkpoints are not supported; our Llama has no biases")
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={get('hidden_act')!r} is not supported; our SwiGLU uses silu")
    d_model, n_heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or d_model // n_heads
    if head_dim * n_heads != d_model:
        raise ValueError(f"head_dim={head_dim} * num_attention_heads={n_heads} != hidden_size={d_model}; "
                         f"our Llama derives head_dim as d_model // n_heads")
    theta = rope.get("rope_theta", get("rope_theta", 10000.0))
    return ModelConfig(
        family="llama", vocab_size=get("vocab_size"), d_model=d_model, n_layers=get("num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=get("num_key_value_heads") or n_heads,
        ffn_hidden=get("intermediate_size"), norm_eps=get("rms_norm_eps"), rope_theta=float(theta),
        max_seq_len=get("max_position_embeddings"), tie_embeddings=bool(get("tie_word_embeddings", False)),
        init_std=get("initializer_range", 0.02),
    )


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our Llama's state dict under Hugging Face names (tensors shared, not copied).

    With tied embeddings `lm_head.weight` is the embedding tensor itself, as in Hugging Face's
    own `state_dict()`, so `LlamaForCausalLM.load_state_dict(..., strict=True)` accepts it.
    """
    out = {}
    for name, tensor in model.state_dict().items():
        hf_name = _rename(name, _OURS_TO_HF)
        if hf_name is None:
            raise ValueError(f"parameter {name!r} has no Hugging Face Llama counterpart; is this a "
                             f"titanforge Llama (model.family='llama')?")
        out[hf_name] = tensor
    if getattr(model, "output", "absent") is None and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> nn.Module:
    """Build our Llama for `cfg` on `device` and load a Hugging Face LlamaForCausalLM state dict.

    Accepts checkpoints with or without `lm_head.weight` when `cfg.tie_embeddings` (Hugging Face
    omits it on save); a tied config with a different lm_head is refused rather than silently dropped.
    """
    from titanforge.models.llama.model import build

    ours = {}
    for name, tensor in sd.items():
        if name.startswith("model.rotary_emb."):
            continue
        our_name = _rename(name, _HF_TO_OURS)
        if our_name is None:
            raise ValueError(f"checkpoint key {name!r} is not part of a Hugging Face LlamaForCausalLM "
                             f"without biases; convert or drop it first")
        ours[our_name] = tensor
    if cfg.tie_embeddings and "output.weight" in ours:
        head = ours.pop("output.weight")
        emb = ours.get("tok_embeddings.weight")
        if emb is None or head.shape != emb.shape or not torch.equal(head.to(emb.device), emb):
            raise ValueError("checkpoint has an lm_head.weight different from embed_tokens.weight but "
                             "model.tie_embeddings=True; set model.tie_embeddings=False to load it")
    with torch.device("meta"):
        model = build(cfg)
    model.to_empty(device=device)
    # Recomputes the RoPE table (not in any checkpoint) and gives every parameter a defined value.
    model.init_weights()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match model config: missing {missing}, unexpected {unexpected}")
    for name, tensor in ours.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape "
                             f"{tuple(expected[name].shape)}; check vocab_size / d_model / heads / ffn_hidden")
    model.load_state_dict(ours, strict=True)
    return model


def export_hf(model: nn.Module, out_dir: str | Path, **config_overrides) -> Path:
    """Write `config.json` + `model.safetensors` that `LlamaForCausalLM.from_pretrained(out_dir)` loads.

    Weights keep the model's dtype (recorded as the config's `dtype`); a tied `lm_head.weight` is
    omitted, as Hugging Face itself saves it.
    """
    from safetensors.torch import save_file

    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError("export_hf needs a titanforge Llama (built by build_model) carrying its ModelConfig as .cfg")
    sd = to_hf_state_dict(model)
    if any(t.is_meta for t in sd.values()):
        raise ValueError("model has meta-device weights; call to_empty(...) and init_weights() or load a checkpoint first")
    dtypes = {t.dtype for t in sd.values()}
    if len(dtypes) != 1:
        raise ValueError(f"mixed parameter dtypes {sorted(map(str, dtypes))}; cast the model to one dtype before export")
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = hf_config(cfg, **config_overrides)
    hf_cfg.dtype = dtypes.pop()
    hf_cfg.architectures = ["LlamaForCausalLM"]
    # The full config (not the diff against defaults), so the file does not depend on the defaults
    # of whichever transformers version reads it.
    hf_cfg.to_json_file(out / "config.json", use_diff=False)
    # safetensors refuses views and shared storage: give each tensor its own contiguous CPU copy.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
