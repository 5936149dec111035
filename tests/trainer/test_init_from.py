"""Hugging Face -> titanforge -> Hugging Face: `init.from` on 2 ranks, then `titanforge export`.

A small Llama and a small Jamba are created by `transformers` itself (random weights,
`save_pretrained`), trained for one step on 2 gloo ranks from `init.from=<that directory>` (Llama
as two pipeline stages, pp=2, each rank reading only its stage's weights; Jamba with its experts
sharded ep=2 and FSDP2 for the rest), with lr 0 so the
weights pass through the step unchanged; the step-1 checkpoint is exported (`export_checkpoint`,
CPU, one process) and loaded back by `from_pretrained`: its logits must equal the original
model's exactly (float32; any weight read into the wrong shard, transposed or dropped changes them:
the checkpoint is written from the shards the run trained with).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from testutil import launch_util as lu
from titanforge.data import read_manifest
from titanforge.launch.export import export_checkpoint
from titanforge.models.common.moe import MoEConfig
from titanforge.models.config import ModelConfig
from titanforge.models.jamba.config import JambaConfig

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

LLAMA = dict(family="llama", vocab_size=50304, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_hidden=64,
             max_seq_len=64, tie_embeddings=False)
JAMBA = dict(family="jamba", vocab_size=50304, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
             max_seq_len=64, tie_embeddings=False, norm_eps=1e-5)
JAMBA_SECTION = dict(layer_pattern="MD AE", d_state=8, chunk_size=16)


def _hf_model(family: str):
    torch.manual_seed(11)
    if family == "llama":
        from titanforge.models.llama.hf import hf_config

        return transformers.LlamaForCausalLM(hf_config(ModelConfig(**LLAMA)))
    from titanforge.models.common.pattern import parse_layer_pattern
    from titanforge.models.jamba.hf import hf_config

    moe = MoEConfig(n_experts=4, top_k=2, topk_norm="none")
    cfg = ModelConfig(**JAMBA, jamba=JambaConfig(**JAMBA_SECTION, moe=moe))
    return transformers.JambaForCausalLM(hf_config(cfg, parse_layer_pattern(cfg.jamba.layer_pattern, cfg.n_layers)))


def _overrides(family: str, data: Path, out: Path, src: Path) -> list[str]:
    model = LLAMA if family == "llama" else JAMBA
    o = {f"model.{k}": v for k, v in model.items()}
    if family == "jamba":
        o.update({f"model.jamba.{k}": (f'"{v}"' if k == "layer_pattern" else v) for k, v in JAMBA_SECTION.items()})
        o.update({"model.jamba.moe.n_experts": 4, "model.jamba.moe.top_k": 2, "model.jamba.moe.topk_norm": "none",
                  "model.jamba.moe.z_loss_coef": 0.0, "model.jamba.moe.load_balance_coef": 0.0, "parallel.ep": 2})
    else:
        o["parallel.pp"] = 2
    o.update({"data.path": data, "output_dir": out, "init.from": src, "parallel.dp_backend": "fsdp",
              "train.steps": 1, "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.val_every": 0,
              "optim.lr": 0.0, "optim.warmup_steps": 1, "checkpoint.every": 1, "wandb.mode": "disabled"})
    return [f"{k}={v}" for k, v in o.items()]


@pytest.mark.parametrize("family", ["llama", "jamba"])
def test_hf_to_titanforge_to_hf_round_trip(family, shakespeare64, tmp_path):
    hf = _hf_model(family).eval()
    src = tmp_path / "hf_in"
    hf.save_pretrained(src)
    out = tmp_path / "run"
    proc = lu.run("configs/llama-tiny.yaml" if family == "llama" else "configs/jamba-tiny.yaml",
                  _overrides(family, shakespeare64, out, src), nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    exported = export_checkpoint(out / "checkpoints" / "step_00000001", tmp_path / "hf_out")
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.JambaForCausalLM
    back = cls.from_pretrained(exported).eval()
    tokens = torch.randint(0, read_manifest(shakespeare64)["vocab_size"], (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(tokens).logits, back(tokens).logits
    assert torch.equal(a, b), (a - b).abs().max()
    assert sorted(lu.losses(out)) == [1]  # the run did train a step


def test_hf_config_mismatch_is_refused_before_anything_loads(tmp_path):
    from titanforge.trainer.init_from import InitFromError, weight_source

    _hf_model("llama").save_pretrained(tmp_path)
    with pytest.raises(InitFromError, match="model.norm_eps=1e-05"):
        weight_source(tmp_path, ModelConfig(**{**LLAMA, "norm_eps": 1e-6}))


@pytest.mark.parametrize("name", ["titans", "ttt"])
def test_own_format_export_round_trip(name, tmp_path):
    """Titans / TTT (no Hugging Face class): a one-process DCP checkpoint -> export (our names) ->
    init.from's reader into a fresh model: every parameter equal."""
    import torch.distributed.checkpoint as dcp

    from titanforge.launch.config import JobConfig, to_yaml
    from titanforge.models.registry import build_model
    from titanforge.parallel.init import init_model_weights
    from titanforge.trainer.init_from import load_model_weights, weight_source

    cfg = ModelConfig(family=name, vocab_size=97, d_model=32, n_layers=2, n_heads=2, ffn_hidden=48, max_seq_len=64)
    model = build_model(cfg, device="meta").to_empty(device="cpu")
    init_model_weights(model, cfg, seed=3)
    ckpt = tmp_path / "step_00000001"
    with pytest.warns(UserWarning):
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    job = JobConfig(model=cfg)
    job.data.path = str(tmp_path)
    (ckpt / "config.yaml").write_text(to_yaml(job))
    out = export_checkpoint(ckpt, tmp_path / "export")
    fresh = build_model(cfg, device="meta").to_empty(device="cpu")
    init_model_weights(fresh, cfg, seed=4)
    load_model_weights(fresh, weight_source(out, cfg), out)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), n
