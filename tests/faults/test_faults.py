"""Faults and mistakes, on real `titanforge train` processes (testutil/faults.py does the injecting).

Each fault's own outcome is checked (exit status, the one line naming the problem and the fix),
and a sequence's end state is compared with an uninterrupted run: the same final weights
(bytes), every step exactly once in metrics.jsonl and in W&B with the same loss. bench/faults.py
runs the same faults at a larger count and commits the figures.
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest

from testutil import faults as F
from testutil import launch_util as lu
from titanforge.launch.cli import main as titanforge

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref(shakespeare64, tmp_path_factory):
    return F.reference(tmp_path_factory.mktemp("ref"), shakespeare64)


def test_kills_corruption_and_a_changed_model_leave_the_run_as_if_uninterrupted(shakespeare64, ref, tmp_path):
    """SIGKILL after saves and inside one, a damaged newest checkpoint (named, fallen back from), a
    resume with another model (refused, nothing touched), then a run to the end."""
    sc = F.Scenario(tmp_path, shakespeare64)
    records, verdict = F.run_sequence(sc, ref, ["kill_after_save", "kill_after_save", "corrupt_checkpoint",
                                                "changed_model", "kill_in_save"], random.Random(7))
    assert all(r.ok for r in records), records
    # Two kills after saves leave two checkpoints: the corruption falls back to the older one and
    # the changed model finds one to refuse.
    assert all(r.injected for r in records[:4]), records
    assert F.good(verdict), verdict


def test_truncated_checksums_falls_back_past_an_older_checkpoint_an_earlier_fault_damaged(shakespeare64, ref,
                                                                                           tmp_path):
    """bench/results/faults.json (seed 1): the newest checkpoint's checksums.json truncated while the
    one before it was still damaged by an earlier fault. The run names the file in one warning line
    and resumes two checkpoints back; the harness must expect that, not the one just before."""
    import shutil

    sc = F.Scenario(tmp_path, shakespeare64)
    shutil.copytree(ref.out / "checkpoints", sc.ckpts)
    step8, step10, step12 = sc.complete()
    F.damage_checkpoint(sc, step10 / ".metadata", "truncate", random.Random(0))
    record = F.fault_corrupt_checkpoint(sc, random.Random(1), ref, file="checksums.json", how="truncate")
    assert record.injected and record.ok, record
    text = (tmp_path / "001-after-corrupt.log").read_text()
    warned = [ln for ln in text.splitlines() if ln.startswith("[checkpoint] WARNING:")]
    assert len(warned) == 2, text
    assert f"{step12}/checksums.json is not valid JSON" in warned[0] and "falling back" in warned[0], warned
    assert f"{step10}/.metadata is corrupted" in warned[1], warned
    assert f"[resume] from {step8} at step 8" in text


def test_second_run_on_the_directory_is_refused_and_a_dead_holder_taken_over(shakespeare64, ref, tmp_path):
    sc = F.Scenario(tmp_path, shakespeare64)
    first = F.Job(sc, {"train.steps": 400}, name="holder")
    assert first.wait_step(1)
    second = F.Job(sc, name="second")
    assert second.wait(timeout=120) == 2
    text = second.text()
    assert f"pid {first.proc.pid}" in text and "checkpoint.break_lock=true" in text and "Traceback" not in text
    first.kill()
    third = F.Job(sc, {"train.steps": 400}, name="takeover")
    assert third.wait_step(1)
    assert f"was held by pid {first.proc.pid}" in third.text() and "its process is gone" in third.text()
    third.kill()


def test_sigterm_to_a_two_process_job_saves_and_exits_0(shakespeare64, tmp_path):
    """SIGTERM to the whole process group (what a scheduler sends): torchrun does not turn the
    ranks' clean stop into exit 1."""
    sc = F.Scenario(tmp_path, shakespeare64, nproc=2)
    job = F.Job(sc, {"train.steps": 400, "checkpoint.every": 1000}, name="sigterm2")
    assert job.wait_step(2)
    os.killpg(job.proc.pid, signal.SIGTERM)
    rc = job.wait(timeout=180)
    text = job.text()
    assert rc == 0, text[-3000:]
    assert "preemption signal: saved step" in text and "Traceback" not in text
    assert len(sc.complete()) == 1


@pytest.mark.skipif(not F.can_limit_size(), reason="needs unshare -rm and tmpfs (a size-limited directory)")
def test_disk_full_during_a_save_is_reported_and_the_partial_removed(shakespeare64, ref, tmp_path):
    record, verdict = F.enospc_run(tmp_path, shakespeare64, ref, size_mb=30)
    assert record.injected and record.ok, record
    assert F.good(verdict), verdict


def test_corrupt_shard_is_counted_in_the_log_line_and_metrics(shakespeare64, tmp_path):
    name, = F.shard_data(shakespeare64, tmp_path / "data", random.Random(0), ("flip",))
    sc = F.Scenario(tmp_path / "run", tmp_path / "data")
    job = F.Job(sc, {"train.steps": 2, "checkpoint.enabled": "false", "wandb.mode": "disabled"}, name="shard")
    assert job.wait() == 0, job.text()
    assert name in job.text() and "data skipped 1 shard(s)" in job.text()
    rows = [r for r in lu.metrics(sc.out) if "loss" in r]
    assert rows and all(r["corrupt_shards"] == 1 and r["skipped_samples"] > 0 for r in rows)


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1", "optim.lr=-1.0 must be a finite number >= 0"),
    ("checkpoint.every=0", "checkpoint.every=0 must be >= 1"),
    ("train.steps=-5", "train.steps=-5 must be >= 1"),
    ("data.path=/nonexistent/data", "data.path=/nonexistent/data"),
    ("output_dir=/proc/version/run", "cannot be created"),
])
def test_input_errors_are_one_line_exit_2(shakespeare64, tmp_path, capsys, override, message):
    args = ["train", str(lu.ROOT / F.CONFIG), f"data.path={shakespeare64}", f"output_dir={tmp_path / 'out'}",
            override]
    assert titanforge(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_yaml_syntax_error_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n   micro_batch_size: [\n")
    assert titanforge(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "YAML syntax error at line 3" in err, err


def test_too_little_free_space_is_refused_before_start(shakespeare64, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 9 << 20, 1 << 20))
    args = ["train", str(lu.ROOT / F.CONFIG), f"data.path={shakespeare64}", f"output_dir={tmp_path / 'out'}"]
    assert titanforge(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1.0 MiB free and the next checkpoint needs about" in err, err


def test_only_corrupt_checkpoints_stop_the_run_unless_a_fresh_start_is_allowed(shakespeare64, ref, tmp_path,
                                                                              capsys):
    """No silent start from step 0 over a directory whose checkpoints are all broken."""
    import shutil

    sc = F.Scenario(tmp_path, shakespeare64)
    shutil.copytree(ref.out / "checkpoints", sc.ckpts)
    for ckpt in sc.complete():
        F.damage(next(ckpt.glob("*.distcp")), "flip", random.Random(0))
    args = ["train", str(lu.ROOT / F.CONFIG), *sc.overrides()]
    assert titanforge(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none of the 3 checkpoints" in err
    assert "checkpoint.allow_fresh_start=true" in err
    assert json.loads((sc.complete()[-1] / "meta.json").read_text())["step"] == 12  # untouched
