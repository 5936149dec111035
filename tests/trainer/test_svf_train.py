"""`finetune.method=svf` end to end through `titanforge train ... --nproc 2`, from one of our
checkpoints and from a Hugging Face Llama (made here by `transformers`, random weights,
`save_pretrained`), under FSDP2 (dp=2) and tensor parallelism (tp=2):

- ours: a base Llama trained 4 steps (1 process); SVF from its checkpoint under FSDP2 computes the
  SVD (split over the 2 ranks) and caches it beside the checkpoint; SVF under TP from the same
  checkpoint reads the cache (logged) and leaves its files untouched (mtimes);
- Hugging Face: SVF under FSDP2 trains, its z-vectors are exported with `titanforge svf export`;
  an SVF run under TP starts from them (`finetune.z_from`, lr 0) and reads the cache written
  beside the Hugging Face directory by the first.

Every run: only z changes, U diag(s) V^T reproduces the base weights (float32, 1e-4), every other
tensor equals the base's exactly (frozen)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testutil import launch_util as lu
from titanforge.launch.svf import export_z
from titanforge.models.config import ModelConfig
from titanforge.trainer.svf import read_z

pytestmark = pytest.mark.slow
# The Hugging Face Llama: TINY_LLAMA's shape, with the fields its config.json fixes.
HF_LLAMA = dict(family="llama", vocab_size=50304, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_hidden=64,
                max_seq_len=64, tie_embeddings=False)


def _weights(step_dir: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    keys = [k for k in meta if k.startswith("model.") and hasattr(meta[k], "size")]
    state = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in keys}
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    return {k[len("model."):]: v for k, v in state.items()}


def _svf(data: Path, out: Path, src: Path, steps: int, nproc: int = 2, **extra) -> str:
    o = lu.overrides(data, out, **{"train.steps": steps, "init.from": src, "finetune.method": "svf",
                                   "parallel.dp_backend": "fsdp", "optim.lr": 5e-2, "checkpoint.every": steps,
                                   "train.val_every": 0, "wandb.mode": "disabled", **extra})
    r = lu.run("configs/llama-tiny.yaml", o, nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[finetune] svf:" in r.stdout
    return r.stdout


def _cache_files(src: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in src.glob("svd-*/*")}


def _check_only_z_trained(base: dict, tuned: dict, moved: bool = True) -> dict:
    zs = {k: v for k, v in tuned.items() if k.endswith(".z")}
    assert zs and all(k.startswith("layers.") for k in zs)
    if moved:
        assert any(not torch.allclose(z, torch.ones_like(z)) for z in zs.values()), "z did not train"
    for name in (k[:-2] for k in zs):
        U, s, Vh = tuned[f"{name}.U"], tuned[f"{name}.s"], tuned[f"{name}.Vh"]
        torch.testing.assert_close((U * s) @ Vh, base[f"{name}.weight"], rtol=1e-4, atol=1e-5)
    for k, v in tuned.items():
        if not k.endswith((".U", ".s", ".Vh", ".z")):  # not decomposed (embedding, norms, head): frozen
            assert torch.equal(v, base[k]), k
    return zs


@pytest.fixture(scope="module")
def ours(shakespeare64, tmp_path_factory):
    root = tmp_path_factory.mktemp("svf")
    base = root / "base"
    r = lu.run("configs/llama-tiny.yaml", lu.overrides(shakespeare64, base, **{"train.steps": 4,
                                                                               "wandb.mode": "disabled"}))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    src = base / "checkpoints" / "step_00000004"
    fsdp = _svf(shakespeare64, root / "fsdp", src, 4)
    cached = _cache_files(src)
    tp = _svf(shakespeare64, root / "tp", src, 2, **{"parallel.tp": 2})
    return {"src": src, "root": root, "fsdp": fsdp, "tp": tp, "cached": cached, "after": _cache_files(src)}


def test_from_our_checkpoint_under_fsdp_and_tp(ours):
    src, root = ours["src"], ours["root"]
    base = _weights(src)
    _check_only_z_trained(base, _weights(root / "fsdp" / "checkpoints" / "step_00000004"))
    _check_only_z_trained(base, _weights(root / "tp" / "checkpoints" / "step_00000002"))


def test_svd_is_computed_once_and_reused(ours):
    assert "[svf] SVD of 14 matrices computed over 2 ranks" in ours["fsdp"]
    assert f"cached in {ours['src']}/svd-" in ours["fsdp"]
    # The second run (another layout, same base and targets) reads the cache and rewrites nothing.
    assert "[svf] SVD of 14 matrices read from the cache" in ours["tp"] and "computed" not in ours["tp"]
    files = ours["cached"]
    assert sum(p.name == "index.json" for p in files) == 1 and len(files) == 14 + 1
    assert ours["after"] == files


def test_export_cli_and_refusals(ours, tmp_path):
    src, root = ours["src"], ours["root"]
    path, n = export_z(root / "fsdp" / "checkpoints" / "step_00000004", tmp_path / "expert.safetensors", task="x")
    zs = read_z(path)
    assert n == sum(z.numel() for z in zs.values()) and all(k.startswith("layers.") for k in zs)
    cli = subprocess.run([sys.executable, "-P", "-m", "titanforge.launch.cli", "svf", "export", str(src),
                          "--out", str(tmp_path / "x.safetensors")], capture_output=True, text=True, env=lu.env())
    assert cli.returncode == 2 and "finetune.method=svf" in cli.stderr  # the base run has no z


def test_from_a_hugging_face_llama_with_export_and_z_from(shakespeare64, tmp_path):
    transformers = pytest.importorskip("transformers")
    from titanforge.models.llama.hf import hf_config
    from titanforge.trainer.init_from import weight_source

    torch.manual_seed(11)
    hf = tmp_path / "hf"
    transformers.LlamaForCausalLM(hf_config(ModelConfig(**HF_LLAMA))).save_pretrained(hf)
    model = {f"model.{k}": v for k, v in HF_LLAMA.items()}
    fsdp = _svf(shakespeare64, tmp_path / "fsdp", hf, 3, **model)
    assert "computed over 2 ranks" in fsdp and f"cached in {hf}/svd-" in fsdp
    tuned = _weights(tmp_path / "fsdp" / "checkpoints" / "step_00000003")
    source = weight_source(hf, ModelConfig(**HF_LLAMA))
    # The Hugging Face weights under our names: the decomposed matrices' and every other tensor's.
    names = [k[:-len(".z")] + ".weight" if k.endswith(".z") else k for k in tuned
             if not k.endswith((".U", ".s", ".Vh"))]
    base = {k: source(k) for k in names}
    zs = _check_only_z_trained(base, tuned)
    expert = tmp_path / "expert.safetensors"
    cli = subprocess.run([sys.executable, "-P", "-m", "titanforge.launch.cli", "svf", "export",
                          str(tmp_path / "fsdp" / "checkpoints" / "step_00000003"), "--out", str(expert)],
                         capture_output=True, text=True, env=lu.env(), cwd=lu.ROOT)
    assert cli.returncode == 0, cli.stderr
    # Start from the expert with lr 0 under TP: the run's z equal the file's, the base is kept.
    tp = _svf(shakespeare64, tmp_path / "tp", hf, 1, **model, **{"parallel.tp": 2, "finetune.z_from": expert,
                                                                "optim.lr": 0.0, "optim.warmup_steps": 1})
    assert "read from the cache" in tp
    again = _weights(tmp_path / "tp" / "checkpoints" / "step_00000001")
    _check_only_z_trained(base, again, moved=False)
    for name, z in read_z(expert).items():
        torch.testing.assert_close(again[f"{name}.z"], z)
        torch.testing.assert_close(z, zs[f"{name}.z"])


def test_lora_baseline_from_our_checkpoint_under_fsdp(ours, shakespeare64, tmp_path):
    """finetune.method=lora (the baseline, whole base per rank): only the LoRA factors change."""
    o = lu.overrides(shakespeare64, tmp_path / "lora", **{
        "train.steps": 2, "init.from": ours["src"], "finetune.method": "lora", "parallel.dp_backend": "fsdp",
        "optim.lr": 5e-2, "checkpoint.every": 2, "train.val_every": 0, "wandb.mode": "disabled"})
    r = lu.run("configs/llama-tiny.yaml", o, nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[finetune] lora:" in r.stdout
    base, tuned = _weights(ours["src"]), _weights(tmp_path / "lora" / "checkpoints" / "step_00000002")
    bs = {k: v for k, v in tuned.items() if k.endswith(".lora_B")}
    assert bs and all(v.abs().max() > 0 for v in bs.values()), "lora_B did not train from zero"
    for k, v in tuned.items():
        if not k.endswith((".lora_A", ".lora_B")):
            assert torch.equal(v, base[k]), k


def test_bad_finetune_settings_are_refused(shakespeare64, tmp_path):
    r = lu.run("configs/llama-tiny.yaml", lu.overrides(shakespeare64, tmp_path / "x", **{
        "finetune.method": "svd"}))
    assert r.returncode == 2 and "finetune.method='svd' must be none | svf | lora" in r.stderr
    r = lu.run("configs/llama-tiny.yaml", lu.overrides(shakespeare64, tmp_path / "y", **{
        "finetune.method": "svf", "parallel.pp": 2}), nproc=2)
    assert r.returncode == 2 and "parallel.pp=1" in r.stderr
    # z-vectors of another model (one matrix, wrong length): one line, before any rank starts.
    from titanforge.trainer.svf import save_z

    save_z(tmp_path / "other.safetensors", {"layers.0.attention.wq": torch.ones(5)})
    r = lu.run("configs/llama-tiny.yaml", lu.overrides(shakespeare64, tmp_path / "z", **{
        "finetune.method": "svf", "finetune.z_from": tmp_path / "other.safetensors"}), nproc=2)
    assert r.returncode == 2 and "does not fit this model's SVF matrices" in r.stderr, r.stderr[-2000:]
    assert "other length ['layers.0.attention.wq']" in r.stderr and "Traceback" not in r.stderr
