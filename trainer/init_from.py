"""`init.from=PATH`: start from pretrained weights, read straight into each rank's shards.

PATH is one of
- a Hugging Face checkpoint directory (`config.json` + `*.safetensors`, sharded or not) of a
  Llama (`LlamaForCausalLM`) or a Jamba (`JambaForCausalLM`); names and layouts are mapped by
  models/llama/hf.py and models/jamba/hf.py's tables (Jamba's fused expert `gate_up_proj` is
  split and transposed per tensor);
- a directory written by `titanforge export` for Titans / TTT (`model.safetensors` under our
  own names, next to `config.yaml`);
- one of our checkpoints (`.../checkpoints/step_N`, DCP): only the model is read; the optimizer,
  schedule and data position start fresh (resuming a run is `checkpoint.resume=auto`).

How: the model is built on meta, the layout applied and the shards allocated as for a random
start (parallel/init.py, which also fills what no checkpoint holds: the rotary tables); then for
each parameter this rank holds a part of, the whole tensor is read (safetensors: memory-mapped;
DCP: a rank-local read, no collectives) and only the local part kept. Peak memory: the shards
plus the largest single tensor. A tensor the checkpoint lacks, or of another shape, stops the
start with a message naming it.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from titanforge.parallel.init import fill_from_full, model_tensors

Source = Callable[[str], torch.Tensor | None]


class InitFromError(ValueError):
    """init.from points at something that cannot start this model; the message says what to do."""


def _safetensors_index(path: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InitFromError(f"init.from={path}: no *.safetensors files there; point it at a Hugging Face checkpoint "
                            f"directory, a `titanforge export` directory or a checkpoints/step_N directory")
    index = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                index[k] = f
    return index


def _reader(index: dict[str, Path]) -> Callable[[str], torch.Tensor | None]:
    from safetensors import safe_open

    def get(key: str) -> torch.Tensor | None:
        if key not in index:
            return None
        with safe_open(str(index[key]), framework="pt") as st:
            return st.get_tensor(key)

    return get


def _llama_source(get) -> Source:
    from titanforge.models.llama.hf import _OURS_TO_HF, _rename

    def source(name: str):
        hf = _rename(name, _OURS_TO_HF)
        return None if hf is None else get(hf)

    return source


_JAMBA_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_JAMBA_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _stack_experts(get, dst: str, proj: str) -> torch.Tensor | None:
    """Per-expert Linear weights ([out, in] each, `save_pretrained`'s on-disk layout) -> our [E, in, out]."""
    ws = []
    while (w := get(f"{dst}feed_forward.experts.{len(ws)}.{proj}.weight")) is not None:
        ws.append(w.t())
    return torch.stack(ws) if ws else None


def _jamba_source(get) -> Source:
    """Inverse of models/jamba/hf.py:to_hf, one of our tensors at a time."""

    def source(name: str):
        top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.final_layernorm.weight",
               "output.weight": "lm_head.weight"}
        if name in top:
            return get(top[name])
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None:
            return None
        dst, rest = f"model.layers.{m.group(1)}.", m.group(2)
        if rest in ("input_layernorm.weight", "pre_ff_layernorm.weight"):
            return get(dst + rest)
        if rest.startswith("mixer."):
            sub = rest[len("mixer."):]
            attn = re.fullmatch(r"(w[qkvo])\.weight", sub)
            return get(f"{dst}self_attn.{_JAMBA_ATTN[attn.group(1)]}.weight") if attn else get(f"{dst}mamba.{sub}")
        if rest == "feed_forward.router.gate.weight":
            return get(dst + "feed_forward.router.weight")
        if rest in ("feed_forward.experts.w1", "feed_forward.experts.w3"):
            gate_up = get(dst + "feed_forward.experts.gate_up_proj")
            if gate_up is not None:  # fused [E, 2H, C] (transformers' in-memory layout, our export)
                return gate_up.chunk(2, dim=1)[rest.endswith("w3")].transpose(1, 2)
            return _stack_experts(get, dst, "up_proj" if rest.endswith("w3") else "gate_proj")
        if rest == "feed_forward.experts.w2":
            down = get(dst + "feed_forward.experts.down_proj")
            return down.transpose(1, 2) if down is not None else _stack_experts(get, dst, "down_proj")
        mlp = re.fullmatch(r"feed_forward\.(w[123])\.weight", rest)
        return get(f"{dst}feed_forward.{_JAMBA_MLP[mlp.group(1)]}.weight") if mlp else None

    return source


def _dcp_source(path: Path) -> Source:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata

    def source(name: str):
        entry = meta.get(f"model.{name}")
        if entry is None or not hasattr(entry, "size"):
            return None
        out = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({f"model.{name}": out}, checkpoint_id=str(path), no_dist=True)
        return out

    return source


def _check_hf_config(hf: dict, cfg, path: Path) -> None:
    """Architecture fields that change the function but not any tensor's shape must match too."""
    rope = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta"))
    pairs = [("rms_norm_eps", hf.get("rms_norm_eps"), "norm_eps", cfg.norm_eps),
             ("num_attention_heads", hf.get("num_attention_heads"), "n_heads", cfg.n_heads),
             ("num_key_value_heads", hf.get("num_key_value_heads"), "n_kv_heads", cfg.kv_heads),
             ("num_hidden_layers", hf.get("num_hidden_layers"), "n_layers", cfg.n_layers),
             ("tie_word_embeddings", hf.get("tie_word_embeddings"), "tie_embeddings", cfg.tie_embeddings)]
    if cfg.family == "llama":
        pairs.append(("rope_theta", rope, "rope_theta", cfg.rope_theta))
    bad = [f"model.{ours}={theirs}" for key, theirs, ours, mine in pairs
           if theirs is not None and (abs(theirs - mine) > 1e-12 * abs(theirs) if isinstance(theirs, float)
                                      else theirs != mine)]
    if bad:
        raise InitFromError(f"init.from={path}: its config.json differs from the model config; set " + " ".join(bad))


def weight_source(path: str | Path, model_cfg) -> Source:
    """A function from our parameter names to full tensors (None where the checkpoint has none)."""
    path = Path(path)
    if not path.is_dir():
        raise InitFromError(f"init.from={path} is not a directory; give a Hugging Face checkpoint directory, a "
                            f"`titanforge export` directory or a checkpoints/step_N directory")
    if (path / ".metadata").exists():
        return _dcp_source(path)
    family = model_cfg.family
    if (path / "config.json").exists():
        hf = json.loads((path / "config.json").read_text())
        kind = hf.get("model_type")
        want = {"llama": "llama", "jamba": "jamba"}.get(family)
        if kind != want:
            raise InitFromError(f"init.from={path} is a Hugging Face {kind!r} checkpoint but model.family={family!r}; "
                                f"Hugging Face checkpoints start Llama (llama) and Jamba (jamba) models")
        _check_hf_config(hf, model_cfg, path)
        get = _reader(_safetensors_index(path))
        return _llama_source(get) if family == "llama" else _jamba_source(get)
    return _reader(_safetensors_index(path))  # our own names (`titanforge export` of Titans / TTT)


@torch.no_grad()
def load_model_weights(model: torch.nn.Module, source: Source, path, skip: frozenset[str] = frozenset()) -> None:
    """Overwrite every parameter of `model` (plain, stage or parallelised) with its part of the source's,
    but those named in `skip` (SVF's factors, which trainer/svf.py derives from the source's weights)."""
    names = {n for n, _ in model.named_parameters()}
    from titanforge.parallel.init import plain_name

    params = {plain_name(n) for n in names}
    for name, target in model_tensors(model).items():
        if name not in params or name in skip:
            continue  # buffers (rotary tables) are derived from the config
        full = source(name)
        if full is None:
            raise InitFromError(f"init.from={path} has no tensor for {name!r}; is it a checkpoint of this model "
                                f"(family, layer pattern, tie_embeddings)?")
        if tuple(full.shape) != tuple(target.shape):
            raise InitFromError(f"init.from={path}: {name!r} has shape {tuple(full.shape)}, the model "
                                f"{tuple(target.shape)}; match model.* (vocab_size, d_model, heads, ffn_hidden) "
                                f"to the checkpoint")
        fill_from_full(target, full.to(target.dtype))


def init_from_fn(path, model_cfg, seed: int, device: torch.device):
    """`parallelize(..., init_fn=...)`: allocate the shards, derive buffers, read the weights."""
    from titanforge.parallel.init import materialize

    source = weight_source(path, model_cfg)

    def init(model: torch.nn.Module) -> torch.nn.Module:
        materialize(model, model_cfg, seed, device)
        load_model_weights(model, source, path)
        return model

    return init
