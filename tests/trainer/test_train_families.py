"""Every tiny preset trains through `titanforge train` on the default corpus and its loss falls.

The default corpus (Shakespeare, GPT-2 BPE) at 64 tokens per sequence; 20 steps of 8
sequences. Starting from ~ln(50257) = 10.8, a model that learns anything at all (unigram
statistics first) is well below 9 after 20 steps; the check is that the mean loss of the last 5
steps is at least 1 nat below the first 5, and that validation ran and is finite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from titanforge.launch.cli import main as titanforge

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.name for p in (ROOT / "configs").glob("*-tiny.yaml"))


def test_every_family_has_a_tiny_preset():
    expected = {"llama-tiny.yaml", "titans-mac-tiny.yaml", "titans-mag-tiny.yaml", "titans-mal-tiny.yaml",
                "titans-lmm-tiny.yaml", "ttt-linear-tiny.yaml", "ttt-mlp-tiny.yaml", "jamba-tiny.yaml"}
    assert expected <= set(PRESETS), expected - set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_and_loss_falls(preset, shakespeare64, tmp_path):
    rc = titanforge(["train", str(ROOT / "configs" / preset), f"data.path={shakespeare64}", f"output_dir={tmp_path}",
                     "model.max_seq_len=64", "train.steps=20", "train.global_batch_size=8",
                     "train.micro_batch_size=4", "train.val_every=20", "train.val_batches=1",
                     "checkpoint.every=20", "optim.warmup_steps=3", "wandb.mode=disabled"])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 20 and not any(r.get("skipped") for r in rows if "loss" in r)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (preset, losses)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 1 and val[0] < first
    assert (tmp_path / "checkpoints" / "step_00000020" / "checksums.json").exists()
