"""`finetune.method=svf` end to end: a base Llama trained briefly, then SVF from its checkpoint on 2
ranks (FSDP2): only the z-vectors change, the SVD is cached beside the base checkpoint, the
experts export with `titanforge svf export` and load back with `finetune.z_from`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testutil import launch_util as lu
from titanforge.launch.svf import export_z
from titanforge.trainer.svf import read_z


def _weights(step_dir: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    keys = [k for k in meta if k.startswith("model.") and hasattr(meta[k], "size")]
    state = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in keys}
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    return {k[len("model."):]: v for k, v in state.items()}


@pytest.fixture(scope="module")
def runs(shakespeare64, tmp_path_factory):
    root = tmp_path_factory.mktemp("svf")
    base = root / "base"
    r = lu.run("configs/llama-tiny.yaml", lu.overrides(shakespeare64, base, **{"train.steps": 4,
                                                                               "wandb.mode": "disabled"}))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    src = base / "checkpoints" / "step_00000004"
    svf = root / "svf"
    o = lu.overrides(shakespeare64, svf, **{"train.steps": 4, "init.from": src, "finetune.method": "svf",
                                           "parallel.dp_backend": "fsdp", "optim.lr": 5e-2,
                                           "wandb.mode": "disabled"})
    r = lu.run("configs/llama-tiny.yaml", o, nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return src, svf, r.stdout


def test_only_z_vectors_train_and_the_base_is_reproduced(runs):
    src, svf, stdout = runs
    assert "[finetune] svf:" in stdout
    base, tuned = _weights(src), _weights(svf / "checkpoints" / "step_00000004")
    zs = {k: v for k, v in tuned.items() if k.endswith(".z")}
    assert zs and any(not torch.allclose(z, torch.ones_like(z)) for z in zs.values()), "z did not train"
    for name in (k[:-2] for k in zs):
        U, s, Vh = tuned[f"{name}.U"], tuned[f"{name}.s"], tuned[f"{name}.Vh"]
        torch.testing.assert_close((U * s) @ Vh, base[f"{name}.weight"], rtol=1e-4, atol=1e-5)
    for k, v in tuned.items():
        if k in base:  # not decomposed (embedding, norms, head): frozen
            assert torch.equal(v, base[k]), k
    assert list(src.glob("svd-*.safetensors")), "the SVD was not cached beside the base checkpoint"


def test_export_and_z_from(runs, shakespeare64, tmp_path):
    src, svf, _ = runs
    path, n = export_z(svf / "checkpoints" / "step_00000004", tmp_path / "expert.safetensors", task="shakespeare")
    zs = read_z(path)
    assert n == sum(z.numel() for z in zs.values()) and all(k.startswith("layers.") for k in zs)
    cli = subprocess.run([sys.executable, "-P", "-m", "titanforge.launch.cli", "svf", "export", str(src),
                          "--out", str(tmp_path / "x.safetensors")], capture_output=True, text=True, env=lu.env())
    assert cli.returncode == 2 and "finetune.method=svf" in cli.stderr  # the base run has no z
    # Starting from the expert with lr 0 keeps it: the run's z equal the file's.
    out = tmp_path / "again"
    r = lu.run("configs/llama-tiny.yaml", lu.overrides(shakespeare64, out, **{
        "train.steps": 1, "init.from": src, "finetune.method": "svf", "finetune.z_from": path, "optim.lr": 0.0,
        "optim.warmup_steps": 1, "checkpoint.every": 1, "wandb.mode": "disabled"}))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    again = _weights(out / "checkpoints" / "step_00000001")
    for name, z in zs.items():
        torch.testing.assert_close(again[f"{name}.z"], z)


def test_bad_finetune_settings_are_refused(shakespeare64, tmp_path):
    r = lu.run("configs/llama-tiny.yaml", lu.overrides(shakespeare64, tmp_path / "x", **{
        "finetune.method": "svd"}))
    assert r.returncode == 2 and "finetune.method='svd' must be none | svf | lora" in r.stderr
    r = lu.run("configs/llama-tiny.yaml", lu.overrides(shakespeare64, tmp_path / "y", **{
        "finetune.method": "svf", "parallel.pp": 2}), nproc=2)
    assert r.returncode == 2 and "parallel.pp=1" in r.stderr
