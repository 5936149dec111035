"""Trainer switches change how a step is computed, not what it computes.

Activation checkpointing recomputes the same ops: losses are bit-identical. torch.compile fuses
ops differently: losses within 1e-4. bf16 autocast: finite and within 0.05 of float32 over 3
steps. Async checkpoint saves give the same checkpoints as synchronous ones (2 gloo ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testutil import launch_util as lu
from titanforge.launch.cli import main as titanforge
from titanforge.trainer.checkpoint import complete_checkpoints, verify

pytestmark = pytest.mark.slow
PRESET = str(Path(__file__).resolve().parents[2] / "configs" / "llama-tiny.yaml")


def _run(data: Path, out: Path, *extra: str) -> list[float]:
    rc = titanforge(["train", PRESET, f"data.path={data}", f"output_dir={out}", "model.d_model=32",
                     "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.max_seq_len=64",
                     "train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=2", "train.val_every=0",
                     "checkpoint.enabled=false", "wandb.mode=disabled", *extra])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def eager(shakespeare64, tmp_path_factory):
    return _run(shakespeare64, tmp_path_factory.mktemp("eager"))


def test_activation_checkpointing_is_bit_identical(shakespeare64, eager, tmp_path):
    assert _run(shakespeare64, tmp_path, "train.activation_checkpointing=true") == eager


def test_compile_matches_eager(shakespeare64, eager, tmp_path):
    assert _run(shakespeare64, tmp_path, "train.compile=true") == pytest.approx(eager, abs=1e-4)


def test_bf16_autocast_trains_close_to_float32(shakespeare64, eager, tmp_path):
    losses = _run(shakespeare64, tmp_path, "train.dtype=bfloat16")
    assert losses != eager  # autocast really ran in bf16
    assert losses == pytest.approx(eager, abs=0.05)


def test_async_save_writes_the_same_checkpoints(shakespeare64, tmp_path):
    common = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
              "model.max_seq_len=64", "train.steps=4", "train.global_batch_size=4", "train.micro_batch_size=2",
              "train.val_every=0", "checkpoint.every=2", "checkpoint.keep_last=3", "wandb.mode=disabled",
              f"data.path={shakespeare64}"]
    sync_out, async_out = tmp_path / "sync", tmp_path / "async"
    for out, flag in ((sync_out, "false"), (async_out, "true")):
        proc = lu.run("configs/llama-tiny.yaml", [*common, f"output_dir={out}", f"checkpoint.async_save={flag}"],
                      nproc=2)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lu.losses(sync_out) == lu.losses(async_out)
    sync_ckpts, async_ckpts = complete_checkpoints(sync_out / "checkpoints"), complete_checkpoints(async_out / "checkpoints")
    assert [p.name for p in async_ckpts] == [p.name for p in sync_ckpts] == ["step_00000002", "step_00000004"]
    for a, s in zip(async_ckpts, sync_ckpts):
        verify(a)
        sums_a = json.loads((a / "checksums.json").read_text())
        sums_s = json.loads((s / "checksums.json").read_text())
        # Model + optimizer shards hold the same bytes whichever way they were written.
        assert {k: v for k, v in sums_a.items() if k.endswith(".distcp")} == \
               {k: v for k, v in sums_s.items() if k.endswith(".distcp")}


def test_flush_denormal_is_on_for_the_run_only(shakespeare64, eager, tmp_path, monkeypatch):
    # FTZ/DAZ on CPU for the run (train.flush_denormal, default on), restored afterwards so the
    # setting does not leak into the caller's process; the losses of this tiny model are unchanged.
    import torch

    calls = []
    real = torch.set_flush_denormal
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: calls.append(on) or real(on))
    assert _run(shakespeare64, tmp_path / "on") == eager
    assert calls == [True, False]
    assert torch.tensor(1e-39) * 1.0 != 0  # off again
    calls.clear()
    _run(shakespeare64, tmp_path / "off", "train.flush_denormal=false")
    assert calls == []


def test_flushed_denormals_are_zero():
    import torch

    try:
        assert torch.set_flush_denormal(True)
        assert torch.tensor(1e-39) * 1.0 == 0
    finally:
        torch.set_flush_denormal(False)
    assert torch.tensor(1e-39) * 1.0 != 0
