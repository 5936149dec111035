"""End to end through `titanforge train`: data parallel equivalence, crash/resume, W&B, stops.

Real processes: torchrun with 2 gloo ranks. Data: the default corpus (Shakespeare, GPT-2 BPE),
prepared once per session with 64-token sequences (fixture `shakespeare64` in conftest.py).
"""

from __future__ import annotations

import glob
import json
import re
import signal
from pathlib import Path

import pytest

from testutil import launch_util as lu
from testutil import wandb_reader

pytestmark = pytest.mark.slow

CONFIG = "configs/llama-tiny.yaml"


_overrides = lu.overrides  # tiny llama-tiny runs (testutil/launch_util.py)


@pytest.fixture(scope="module")
def uninterrupted(shakespeare64, tmp_path_factory):
    """A 2-process run of 8 steps that nothing interrupts: the reference for the other tests."""
    out = tmp_path_factory.mktemp("ref")
    proc = lu.run(CONFIG, _overrides(shakespeare64, out), nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


@pytest.fixture(scope="module")
def one_process(shakespeare64, tmp_path_factory):
    """The same 8 steps in one process: the global batch of 8 as two accumulated micro-batches."""
    out = tmp_path_factory.mktemp("one")
    proc = lu.run(CONFIG, _overrides(shakespeare64, out, **{"checkpoint.enabled": False}), nproc=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return lu.losses(out)


# Tolerance: float32 summation order differs (accumulated micro-batches vs all-reduce, vocab-
# parallel cross-entropy, sharded norms), compounded over 8 AdamW steps.
@pytest.mark.parametrize("layout", [None, "parallel.tp=2", "parallel.dp_backend=fsdp"])
def test_two_process_layouts_match_one_process(shakespeare64, uninterrupted, one_process, tmp_path, layout):
    if layout is None:  # data parallel with DDP: the fixture's run
        two = lu.losses(uninterrupted[0])
    else:
        key, value = layout.split("=")
        proc = lu.run(CONFIG, _overrides(shakespeare64, tmp_path, **{key: value, "checkpoint.enabled": False}),
                      nproc=2)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        two = lu.losses(tmp_path)
    assert sorted(one_process) == sorted(two) == list(range(1, 9))
    for step in one_process:
        assert two[step] == pytest.approx(one_process[step], rel=1e-5, abs=1e-5), (layout, step)


def test_resume_across_a_change_of_layout(shakespeare64, uninterrupted, tmp_path):
    """Saved at dp=2 (DDP), resumed at tp=2: the next steps' losses match the dp=2 run's."""
    import shutil

    ref_out, _ = uninterrupted
    shutil.copytree(ref_out / "checkpoints", tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000008")
    proc = lu.run(CONFIG, _overrides(shakespeare64, tmp_path, **{"parallel.tp": 2}), nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step_00000006" in proc.stdout and "[resume] from" in proc.stdout
    resumed, ref = lu.losses(tmp_path), lu.losses(ref_out)
    assert sorted(resumed) == [7, 8]
    for step in (7, 8):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5)


def test_log_line_per_step_and_where_things_are(uninterrupted):
    out, stdout = uninterrupted
    lines = [ln for ln in stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 8
    for key in ("loss", "lr", "gnorm", "tok/s", "mfu", "mem"):
        assert all(f"| {key} " in ln for ln in lines), key
    assert "[val] step 4" in stdout and "[val] step 8" in stdout
    assert f"checkpoints: {out}/checkpoints" in stdout and "W&B run" in stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]


def test_wandb_offline_run_holds_the_metrics(uninterrupted):
    out, _ = uninterrupted
    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    rows = [r for r in wandb_reader.history(runs[0]) if "loss" in r]
    logged = lu.losses(out)
    assert {r["_step"]: r["loss"] for r in rows} == logged
    assert wandb_reader.config(runs[0])["model"]["d_model"] == 32


def test_sigkill_then_restart_resumes_bit_identically(shakespeare64, uninterrupted, tmp_path):
    ref_out, _ = uninterrupted
    overrides = _overrides(shakespeare64, tmp_path)
    proc = lu.start(CONFIG, overrides, nproc=2)
    lu.wait_for_step(proc, tmp_path, 5)
    lu.kill_job(proc)
    assert max(lu.losses(tmp_path)) < 8
    second = lu.run(CONFIG, overrides, nproc=2)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "[resume] from" in second.stdout
    # Bit-identical: the exact float32 values, not a tolerance.
    assert lu.losses(tmp_path) == lu.losses(ref_out)
    # The W&B run continues under the same id (offline: one folder per launch, same id).
    ids = {Path(p).name.rsplit("-", 1)[-1] for p in glob.glob(str(tmp_path / "wandb" / "offline-run-*"))}
    assert len(ids) == 1


def test_corrupt_checkpoint_is_detected_and_previous_used(shakespeare64, uninterrupted, tmp_path):
    ref_out, _ = uninterrupted
    import shutil

    shutil.copytree(ref_out / "checkpoints", tmp_path / "checkpoints")
    shard = sorted((tmp_path / "checkpoints" / "step_00000008").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x5A
    shard.write_bytes(bytes(data))
    proc = lu.run(CONFIG, _overrides(shakespeare64, tmp_path), nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step_00000008/__0_0.distcp is corrupted" in proc.stdout or "is corrupted" in proc.stdout
    assert "[resume] from" in proc.stdout and "step_00000006" in proc.stdout
    # Steps 7 and 8 are replayed from step 6 and give the same losses as the first time.
    replay = lu.losses(tmp_path)
    assert replay[7] == lu.losses(ref_out)[7] and replay[8] == lu.losses(ref_out)[8]


def test_nonfinite_steps_are_skipped_then_the_run_stops_without_saving(shakespeare64, tmp_path):
    # lr 1e30 makes the first update blow the weights up: every later loss is inf/nan.
    proc = lu.run(CONFIG, _overrides(shakespeare64, tmp_path, **{"optim.lr": 1e30, "optim.warmup_steps": 0,
                                                                 "optim.grad_clip": 0, "checkpoint.every": 1,
                                                                 "train.max_consecutive_nonfinite": 3}), nproc=1)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "3 non-finite steps in a row" in proc.stdout
    rows = lu.metrics(tmp_path)
    assert [r["skipped"] for r in rows if "loss" in r][-3:] == [True, True, True]
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved and all(int(name.split("_")[1]) <= 1 for name in saved), saved


def test_preemption_signal_on_one_rank_saves_and_exits_cleanly(shakespeare64, tmp_path):
    proc = lu.start(CONFIG, _overrides(shakespeare64, tmp_path, **{"train.steps": 200, "checkpoint.every": 1000}),
                    nproc=2)
    lu.wait_for_step(proc, tmp_path, 2)
    workers = lu.ranks(proc)
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGUSR1)  # only one rank is told; both must stop at the same step
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preemption signal: saved step" in out
    saved = sorted((tmp_path / "checkpoints").iterdir())
    assert len(saved) == 1 and int(saved[0].name.split("_")[1]) == max(lu.losses(tmp_path)) < 200
    meta = json.loads((saved[0] / "meta.json").read_text())
    assert meta["world_size"] == 2


def test_launcher_starts_the_ranks_with_huge_pages(uninterrupted):
    """`titanforge train` runs itself again once with glibc's huge-page malloc tunable (glibc reads
    tunables at start only); torchrun's ranks inherit it and rank 0 reports its CPU settings."""
    line = next((ln for ln in uninterrupted[1].splitlines() if ln.startswith("[cpu]")), None)
    assert line is not None, uninterrupted[1][-2000:]
    assert "huge pages: on" in line and "freed memory kept: on" in line and "denormals flushed: on" in line


def test_cpu_line_spells_out_the_rank_peak(uninterrupted):
    """Each of the 2 ranks runs one thread (torchrun's default): the MFU peak counts one thread at
    the vector units' FLOP/cycle and a clock, and says where the clock came from."""
    line = next(ln for ln in uninterrupted[1].splitlines() if ln.startswith("[cpu]"))
    assert re.search(r"peak \d+ GFLOP/s = 1 thread\(s\) x \d+ FLOP/cycle x [0-9.]+ GHz \(", line), line
