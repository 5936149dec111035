"""Pipeline parallelism end to end through `titanforge train` (2 gloo processes, parallel.pp=2).

Model: configs/llama-tiny.yaml shrunk (d_model 32, 2 layers: one per stage, tied embeddings, so
the last stage's copy of the embedding is exercised), global batch 8 as 2 micro-batches of 4,
i.e. the 2 pipeline micro-batches of the 1F1B schedule. Checked:
- the 8 training losses and the validation loss equal the one-process run's within rel/abs 1e-5
  (float32; summation order differs: stage boundaries, the tied-gradient sum and the norm's
  reduction over stages; the same tolerance as the dp/tp end-to-end tests);
- a checkpoint saved at dp=2 (DDP) resumes at pp=2, and one saved at pp=2 resumes in one process:
  the next steps' losses equal those of the run that saved it (DCP by parameter name).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from testutil import launch_util as lu

pytestmark = pytest.mark.slow

CONFIG = "configs/llama-tiny.yaml"
TOL = 1e-5


_overrides = lu.overrides  # tiny llama-tiny runs (testutil/launch_util.py)


def _train(data: Path, out: Path, nproc: int, **extra):
    proc = lu.run(CONFIG, _overrides(data, out, **extra), nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _val(out: Path) -> dict[int, float]:
    return {m["step"]: m["val_loss"] for m in lu.metrics(out) if "val_loss" in m}


@pytest.fixture(scope="module")
def one_process(shakespeare64, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp_one")
    _train(shakespeare64, out, 1, **{"checkpoint.enabled": False})
    return out


@pytest.fixture(scope="module")
def pipeline(shakespeare64, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp_two")
    _train(shakespeare64, out, 2, **{"parallel.pp": 2})
    return out


def test_pipeline_matches_one_process(one_process, pipeline):
    one, pp = lu.losses(one_process), lu.losses(pipeline)
    assert sorted(one) == sorted(pp) == list(range(1, 9))
    for step in one:
        assert pp[step] == pytest.approx(one[step], rel=TOL, abs=TOL), step
    val_one, val_pp = _val(one_process), _val(pipeline)
    assert sorted(val_one) == sorted(val_pp) == [4, 8]
    for step in val_one:
        assert val_pp[step] == pytest.approx(val_one[step], rel=TOL, abs=TOL), step


def _resume(saved: Path, out: Path, data: Path, nproc: int, **extra) -> dict[int, float]:
    shutil.copytree(saved / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / "step_00000008")
    proc = _train(data, out, nproc, **extra)
    assert "[resume] from" in proc.stdout and "step_00000006" in proc.stdout, proc.stdout[-2000:]
    return lu.losses(out)


def test_dp2_checkpoint_resumes_at_pp2(shakespeare64, tmp_path):
    dp = tmp_path / "dp"
    _train(shakespeare64, dp, 2)
    resumed = _resume(dp, tmp_path / "pp", shakespeare64, 2, **{"parallel.pp": 2})
    ref = lu.losses(dp)
    assert sorted(resumed) == [7, 8]
    for step in (7, 8):
        assert resumed[step] == pytest.approx(ref[step], rel=TOL, abs=TOL), step


def test_pp2_checkpoint_resumes_in_one_process(shakespeare64, pipeline, tmp_path):
    resumed = _resume(pipeline, tmp_path, shakespeare64, 1)
    ref = lu.losses(pipeline)
    assert sorted(resumed) == [7, 8]
    for step in (7, 8):
        assert resumed[step] == pytest.approx(ref[step], rel=TOL, abs=TOL), step
