"""`titanforge train` with parallel.cp=2 on 2 gloo ranks: the same losses as one process, and a
checkpoint written at cp=2 resumes at dp=2 (cp=1) onto the same losses.

Titans MAC (the deep memory's state crosses ranks in every layer) on the default corpus at 64
tokens per sequence, 32 per rank (segment_len 32). float32: summation order differs between the
piecewise and the whole-sequence runs, compounded over 4 AdamW steps.
"""

from __future__ import annotations

import shutil

import pytest

from testutil import launch_util as lu

pytestmark = pytest.mark.slow

CONFIG = "configs/titans-mac-tiny.yaml"
BASE = {**lu.TINY_LLAMA, "model.n_heads": 4, "train.global_batch_size": 4, "train.micro_batch_size": 2,
        "model.titans.segment_len": 32, "model.titans.chunk_size": 16,
        "train.steps": 4, "train.val_every": 0, "checkpoint.every": 2}


def _run(data, out, nproc, **extra):
    proc = lu.run(CONFIG, lu.overrides(data, out, base=BASE, **extra), nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_cp2_matches_one_process_and_resumes_at_dp2(shakespeare64, tmp_path):
    _run(shakespeare64, tmp_path / "one", 1, **{"checkpoint.enabled": False})
    _run(shakespeare64, tmp_path / "cp2", 2, **{"parallel.cp": 2})
    one, cp2 = lu.losses(tmp_path / "one"), lu.losses(tmp_path / "cp2")
    assert sorted(one) == sorted(cp2) == list(range(1, 5))
    for step in one:
        assert cp2[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), step
    # Resume the cp=2 run's step-2 checkpoint at dp=2: steps 3 and 4 as the cp=2 run had them.
    shutil.copytree(tmp_path / "cp2" / "checkpoints", tmp_path / "dp2" / "checkpoints")
    shutil.rmtree(tmp_path / "dp2" / "checkpoints" / "step_00000004")
    proc = _run(shakespeare64, tmp_path / "dp2", 2)
    assert "step_00000002" in proc.stdout and "[resume] from" in proc.stdout
    resumed = lu.losses(tmp_path / "dp2")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(cp2[step], rel=1e-5, abs=1e-5), step


def test_impossible_split_is_rejected_by_validate(shakespeare64, tmp_path):
    """The config's validate() reads the prepared data's sequence length (64): 32 tokens per rank
    cannot hold a 64-token MAC segment; activation checkpointing composes with cp (no error for it)."""
    from titanforge.launch.config import load_config, validate

    over = lu.overrides(shakespeare64, tmp_path, base=BASE, **{"parallel.cp": 2, "model.titans.segment_len": 64,
                                                               "train.activation_checkpointing": True})
    with pytest.raises(ValueError) as err:  # ConfigError, from load_config's validate()
        validate(load_config(lu.ROOT / CONFIG, over), world_size=2)
    assert "model.titans.segment_len=64" in str(err.value) and "no cp > 1 fits" in str(err.value)
    assert "activation_checkpointing" not in str(err.value)


def test_llama_cp2_zigzag_with_activation_checkpointing_matches_one_process(shakespeare64, tmp_path):
    """Llama through `titanforge train` at cp=2 with the default zig-zag attention split and
    activation checkpointing (the recompute replays no state here: full attention's gathers and
    exchanges run again) against one process, 3 steps, float32 (same tolerance as above)."""
    base = {**lu.TINY_LLAMA, "train.steps": 3, "train.val_every": 0}

    def run(out, nproc, **extra):
        over = lu.overrides(shakespeare64, out, base=base, **{"checkpoint.enabled": False, **extra})
        proc = lu.run("configs/llama-tiny.yaml", over, nproc=nproc)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return lu.losses(out)

    one = run(tmp_path / "one", 1)
    cp2 = run(tmp_path / "cp2", 2, **{"parallel.cp": 2, "parallel.cp_split": "zigzag",
                                      "train.activation_checkpointing": True})
    assert sorted(one) == sorted(cp2) == [1, 2, 3]
    for step in one:
        assert cp2[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), step
