"""Weight mapping between our Jamba and Hugging Face `transformers.JambaForCausalLM`.

`to_hf(model)` -> (HF JambaConfig, HF state dict); `from_hf(hf_config, hf_state_dict)` ->
(ModelConfig, our state dict); `export_hf(model, path)` writes `model.safetensors` and
`config.json` that `JambaForCausalLM.from_pretrained(path)` loads. transformers is imported lazily.

Names are one to one except: attention wq/wk/wv/wo <-> q_proj/k_proj/v_proj/o_proj; SwiGLU
w1/w3/w2 <-> gate_proj/up_proj/down_proj; experts w1, w3 [E, C, H] <-> gate_up_proj
[E, 2H, C] (gate rows first), w2 [E, H, C] <-> down_proj [E, C, H]; router.gate <-> router.

What HF Jamba cannot express (export raises ValueError): Mamba-2 layers, layers without a
feed-forward, patterns that are not "attention at i % p == o, MoE at i % q == r", expert widths
different from the dense width, and renormalised top-k (HF uses raw softmax weights, our
`topk_norm="none"`). Loss conventions: our load-balancing loss is HF's `load_balancing_loss_func`
(pooled over all MoE layers, fractions summing to k; models/common/moe.py), so
`router_aux_loss_coef` and `moe.load_balance_coef` are the same number both ways. HF has no
router z-loss. Logits are identical.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from titanforge.models.common.pattern import LayerSpec, format_layer_pattern
from titanforge.models.config import ModelConfig
from titanforge.models.jamba.config import JambaConfig

_MAMBA_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                 "dt_proj.bias", "A_log", "D", "out_proj.weight", "dt_layernorm.weight",
                 "b_layernorm.weight", "c_layernorm.weight")
_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _period_offset(indices: list[int], n: int, what: str, pattern: str) -> tuple[int, int]:
    """(period, offset) with {i < n : i % period == offset} == indices; none -> (n + 1, n)."""
    target = set(indices)
    if not target:
        return n + 1, n
    for p in range(1, n + 1):
        o = indices[0] % p
        if {i for i in range(n) if i % p == o} == target:
            return p, o
    raise ValueError(f"the {what} layers {indices} of pattern {pattern!r} are not of the form i % period == "
                     f"offset, which is all Hugging Face Jamba can express; use a periodic pattern to export")


def hf_config(cfg: ModelConfig, specs: list[LayerSpec]):
    """The HF `JambaConfig` equivalent to `cfg` (raises ValueError where HF cannot express it)."""
    from transformers import JambaConfig as HFJambaConfig

    j, n = cfg.jamba, cfg.n_layers
    pattern = format_layer_pattern(specs)
    bad = [i for i, s in enumerate(specs) if s.mixer not in ("mamba", "attention") or s.ffn == "none"]
    if bad:
        raise ValueError(f"layers {bad} of pattern {pattern!r} use Mamba-2 or no feed-forward, which Hugging "
                         f"Face Jamba lacks; export needs M/A mixers with D/E feed-forwards")
    if j.moe.expert_hidden not in (0, cfg.ffn_dim):
        raise ValueError(f"HF Jamba uses one intermediate_size for experts and dense MLPs; set "
                         f"model.jamba.moe.expert_hidden=0 (got {j.moe.expert_hidden}, ffn_dim {cfg.ffn_dim})")
    if j.moe.topk_norm != "none":
        raise ValueError(f"HF Jamba does not renormalise top-k weights; model.jamba.moe.topk_norm must be "
                         f"'none' to export (got {j.moe.topk_norm!r})")
    attn_p, attn_o = _period_offset([i for i, s in enumerate(specs) if s.mixer == "attention"], n,
                                    "attention", pattern)
    moe_layers = [i for i, s in enumerate(specs) if s.ffn == "moe"]
    moe_p, moe_o = _period_offset(moe_layers, n, "MoE", pattern)
    return HFJambaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=n, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        num_experts=j.moe.n_experts if moe_layers else 1, num_experts_per_tok=j.moe.top_k,
        router_aux_loss_coef=j.moe.load_balance_coef,
        attn_layer_period=attn_p, attn_layer_offset=attn_o, expert_layer_period=moe_p, expert_layer_offset=moe_o,
        mamba_d_state=j.d_state, mamba_d_conv=j.d_conv, mamba_expand=j.expand,
        mamba_dt_rank=j.dt_rank or -(-cfg.d_model // 16), mamba_conv_bias=True, mamba_proj_bias=False,
        use_mambapy=True, pad_token_id=None, max_position_embeddings=max(cfg.max_seq_len, 1))


def to_hf(model) -> tuple[object, dict[str, torch.Tensor]]:
    """Our Jamba -> (HF JambaConfig, HF state dict of detached tensors)."""
    cfg, specs = model.cfg, model.specs
    config = hf_config(cfg, specs)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"],
           "model.final_layernorm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight" if not cfg.tie_embeddings else "tok_embeddings.weight"]}
    for i, spec in enumerate(specs):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for norm in ("input_layernorm", "pre_ff_layernorm"):
            out[f"{dst}{norm}.weight"] = sd[f"{src}{norm}.weight"]
        if spec.mixer == "mamba":
            for p in _MAMBA_PARAMS:
                out[f"{dst}mamba.{p}"] = sd[f"{src}mixer.{p}"]
        else:
            for ours, theirs in _ATTN.items():
                out[f"{dst}self_attn.{theirs}.weight"] = sd[f"{src}mixer.{ours}.weight"]
        ff = f"{src}feed_forward."
        if spec.ffn == "mlp":
            for ours, theirs in _MLP.items():
                out[f"{dst}feed_forward.{theirs}.weight"] = sd[f"{ff}{ours}.weight"]
        else:
            out[f"{dst}feed_forward.router.weight"] = sd[f"{ff}router.gate.weight"]
            out[f"{dst}feed_forward.experts.gate_up_proj"] = torch.cat(
                [sd[f"{ff}experts.w1"].transpose(1, 2), sd[f"{ff}experts.w3"].transpose(1, 2)], dim=1).contiguous()
            out[f"{dst}feed_forward.experts.down_proj"] = sd[f"{ff}experts.w2"].transpose(1, 2).contiguous()
    return config, out


def from_hf(config, state_dict: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """HF (JambaConfig, state dict) -> (our ModelConfig, our state dict)."""
    n = config.num_hidden_layers
    specs = [LayerSpec("attention" if t == "attention" else "mamba", "moe" if e > 1 else "mlp")
             for t, e in zip(config.layers_block_type, config.layers_num_experts)]
    jcfg = JambaConfig(layer_pattern=format_layer_pattern(specs), d_state=config.mamba_d_state,
                       d_conv=config.mamba_d_conv, expand=config.mamba_expand, dt_rank=config.mamba_dt_rank)
    jcfg.moe.n_experts, jcfg.moe.top_k = config.num_experts, config.num_experts_per_tok
    jcfg.moe.load_balance_coef = config.router_aux_loss_coef
    cfg = ModelConfig(family="jamba", vocab_size=config.vocab_size, d_model=config.hidden_size, n_layers=n,
                      n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
                      ffn_hidden=config.intermediate_size, norm_eps=config.rms_norm_eps,
                      tie_embeddings=bool(config.tie_word_embeddings), init_std=config.initializer_range,
                      jamba=jcfg)
    sd = state_dict
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.final_layernorm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    attn_inv, mlp_inv = {v: k for k, v in _ATTN.items()}, {v: k for k, v in _MLP.items()}
    for key, val in sd.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if not m:
            continue
        i, rest = m.group(1), m.group(2)
        dst = f"layers.{i}."
        if rest.startswith("mamba."):
            out[dst + "mixer." + rest[len("mamba."):]] = val
        elif rest.startswith("self_attn."):
            name = rest.split(".")[1]
            out[f"{dst}mixer.{attn_inv[name]}.weight"] = val
        elif rest == "feed_forward.router.weight":
            out[dst + "feed_forward.router.gate.weight"] = val
        elif rest == "feed_forward.experts.gate_up_proj":
            w1, w3 = val.chunk(2, dim=1)
            out[dst + "feed_forward.experts.w1"] = w1.transpose(1, 2).contiguous()
            out[dst + "feed_forward.experts.w3"] = w3.transpose(1, 2).contiguous()
        elif rest == "feed_forward.experts.down_proj":
            out[dst + "feed_forward.experts.w2"] = val.transpose(1, 2).contiguous()
        elif rest.startswith("feed_forward."):
            name = rest.split(".")[1]
            out[f"{dst}feed_forward.{mlp_inv[name]}.weight"] = val
        else:
            out[dst + rest] = val
    return cfg, out


def export_hf(model, path: str | Path) -> Path:
    """Write `model.safetensors` + `config.json` loadable by `JambaForCausalLM.from_pretrained(path)`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config, sd = to_hf(model)
    if config.tie_word_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    save_file({k: v.contiguous().cpu() for k, v in sd.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    config.architectures = ["JambaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    return path
