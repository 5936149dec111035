"""`titanforge train --nproc 2 parallel.dp_backend=deepspeed`: ZeRO 1/2/3 in the trainer (trainer/deepspeed_step.py).

Real processes: torchrun with 2 gloo ranks, tiny llama (d_model 32, 2 layers), the default corpus
as 64-token sequences, 6 steps of a global batch of 8 as micro-batches of 2 (2 accumulated per
rank; 4 in the single process), AdamW at lr 3e-3 with warmup 2 and cosine decay, gradients
clipped at 1.0 (later steps' norms exceed it, so the engine's clipping is exercised).

Tolerance: per-step losses within 1e-5 relative (1e-5 absolute) of the DDP run and of the
single-process run. The runs differ only in float32 summation order (ZeRO's flattened
reduce-scatter vs DDP's bucketed all-reduce vs one process's accumulation), compounded over 6
AdamW steps; measured differences are <= 1e-7 absolute (losses ~10.8). The logged gradient norm
(DeepSpeed's own, `engine.get_global_grad_norm()`) within 5e-4 relative of DDP's: measured
3e-5 to 1.3e-4 apart. The gradients are the same; the norms are not computed alike: torch's float32
`vector_norm` on CPU over the 1.6M-element embedding gradient is itself 1e-5 to 1e-4 relative off
its float64 value, while DeepSpeed sums squares per partition (two halves) and lands within 1e-7
of the float64 norm (checked by hand on the first step). A ZeRO-3 run resumed from its own
checkpoint repeats the uninterrupted run's losses exactly (float32 bit-identical).
Non-finite steps: ZeRO skips the update itself and the loop counts it (lr 1e30, one process).
DeepSpeed's import and engine start cost ~10-20 s per launch; seven launches in all (~2.5 min).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from testutil import launch_util as lu

from titanforge.trainer.checkpoint import CheckpointError, Checkpointer
from titanforge.trainer.config import CheckpointConfig
from titanforge.trainer.dist import DistInfo

pytestmark = pytest.mark.slow

CONFIG = "configs/llama-tiny.yaml"
STEPS = 6
STAGES = (1, 2, 3)


def _overrides(data: Path, out: Path, **extra) -> list[str]:
    base = {"data.path": data, "output_dir": out, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
            "model.n_kv_heads": 2, "model.max_seq_len": 64, "train.global_batch_size": 8,
            "train.micro_batch_size": 2, "train.steps": STEPS, "train.val_every": 3, "train.val_batches": 2,
            "optim.lr": 3e-3, "optim.warmup_steps": 2, "optim.grad_clip": 1.0, "checkpoint.enabled": False,
            "wandb.mode": "disabled"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _run(data: Path, out: Path, nproc: int, **extra) -> Path:
    proc = lu.run(CONFIG, _overrides(data, out, **extra), nproc=nproc, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.fixture(scope="module")
def runs(shakespeare64, tmp_path_factory) -> dict:
    """One process, DDP on 2 ranks, ZeRO 1/2/3 on 2 ranks (ZeRO-3 saving every 2 steps)."""
    pytest.importorskip("deepspeed")
    mk = tmp_path_factory.mktemp
    out = {"one": _run(shakespeare64, mk("one"), 1), "ddp": _run(shakespeare64, mk("ddp"), 2)}
    for stage in STAGES:
        extra = {"parallel.dp_backend": "deepspeed", "parallel.zero_stage": stage}
        if stage == 3:
            extra.update({"checkpoint.enabled": True, "checkpoint.every": 2, "checkpoint.keep_last": 3})
        out[stage] = _run(shakespeare64, mk(f"zero{stage}"), 2, **extra)
    return out


def _series(out: Path, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in lu.metrics(out) if key in m}


@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_matches_ddp_and_one_process(runs, stage):
    zero = _series(runs[stage], "loss")
    assert sorted(zero) == list(range(1, STEPS + 1))
    for ref in ("ddp", "one"):
        expected = _series(runs[ref], "loss")
        for step in zero:
            assert zero[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-5), (stage, ref, step)
    # The logged gradient norm is DeepSpeed's global norm (engine.get_global_grad_norm), before clipping.
    norms, ddp_norms = _series(runs[stage], "grad_norm"), _series(runs["ddp"], "grad_norm")
    for step in norms:
        assert norms[step] == pytest.approx(ddp_norms[step], rel=5e-4), (stage, step)
    assert max(ddp_norms.values()) > 1.0, "clipping at 1.0 never acted: the test would not see it"
    assert _series(runs[stage], "lr") == _series(runs["ddp"], "lr")
    assert _series(runs[stage], "loss")[STEPS] < _series(runs[stage], "loss")[1] - 0.1


def test_zero_runs_validate_and_write_deepspeed_checkpoints(runs):
    stdout = (runs[3] / "stdout.txt").read_text()
    assert "[val] step 3" in stdout and "[val] step 6" in stdout
    # Not a sharded start, and the run says so (docs/design.md, "Sharded start").
    assert "every rank holds the whole model at start" in stdout and "parallel.dp_backend=fsdp" in stdout
    ckpts = sorted(p.name for p in (runs[3] / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000004", "step_00000006"]
    last = runs[3] / "checkpoints" / "step_00000006"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["format"] == "deepspeed" and meta["world_size"] == 2 and meta["step"] == 6
    sums = json.loads((last / "checksums.json").read_text())
    # DeepSpeed's files (one optimizer partition per rank) are covered by the checksums.
    assert {f"deepspeed/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(sums)
    assert {"rank_00000.pt", "rank_00001.pt", "meta.json"} <= set(sums)


def test_zero3_resume_after_corrupt_checkpoint_repeats_the_run(shakespeare64, runs, tmp_path):
    """Newest checkpoint (6) gone, the next (4) corrupted: resume from 2; steps 3-6 as uninterrupted, exactly."""
    shutil.copytree(runs[3] / "checkpoints", tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000006")
    part = tmp_path / "checkpoints" / "step_00000004" / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(part.read_bytes())
    data[-200] ^= 0x5A
    part.write_bytes(bytes(data))
    _run(shakespeare64, tmp_path, 2, **{"parallel.dp_backend": "deepspeed", "parallel.zero_stage": 3,
                                        "checkpoint.enabled": True, "checkpoint.every": 2})
    stdout = (tmp_path / "stdout.txt").read_text()
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is corrupted" in stdout
    assert "[resume] from" in stdout and "step_00000002 at step 2" in stdout
    resumed, ref = _series(tmp_path, "loss"), _series(runs[3], "loss")
    assert sorted(resumed) == [3, 4, 5, 6]
    assert {s: resumed[s] for s in resumed} == {s: ref[s] for s in resumed}


def test_deepspeed_checkpoint_on_another_world_size_is_rejected(runs):
    ckpt = runs[3] / "checkpoints" / "step_00000002"
    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"written by DeepSpeed ZeRO on 2 ranks and this run has 1.*"
                                              r"Resume with 2 processes in all \(e.g\. --nproc 2\)"):
        Checkpointer(runs[3] / "checkpoints", CheckpointConfig(), one).load(ckpt, model, None)


def test_deepspeed_checkpoint_into_another_backend_is_rejected(runs):
    """Same world size, but DDP/FSDP (DCP) cannot read DeepSpeed's files: the message names the backend."""
    ckpt = runs[3] / "checkpoints" / "step_00000002"
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"saved in the deepspeed format and this run uses dcp checkpoints; "
                                              r"resume with parallel\.dp_backend=deepspeed"):
        Checkpointer(runs[3] / "checkpoints", CheckpointConfig(), two).load(ckpt, model, None)


def test_nonfinite_steps_are_skipped_by_the_engine_and_counted(shakespeare64, tmp_path):
    """lr 1e30: after step 1 the gradients overflow; ZeRO skips the update, the loop counts the skip from the
    infinite norm and stops after 3 in a row without saving. One process (no torchrun): DeepSpeed gets a
    one-rank process group from the step."""
    proc = lu.run(CONFIG, _overrides(shakespeare64, tmp_path, **{
        "parallel.dp_backend": "deepspeed", "parallel.zero_stage": 2, "optim.lr": 1e30, "optim.warmup_steps": 0,
        "optim.grad_clip": 0, "checkpoint.enabled": True, "checkpoint.every": 1,
        "train.max_consecutive_nonfinite": 3, "train.val_every": 0}), nproc=1, timeout=240)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 non-finite steps in a row at step 4" in proc.stdout
    rows = [m for m in lu.metrics(tmp_path) if "loss" in m]
    assert [r["skipped"] for r in rows] == [False, True, True, True]
    assert all(r["grad_norm"] is None for r in rows[1:])  # inf, written as null
    # The blown-up model predicts uniformly (loss ln V) and stays finite: had the engine applied the
    # inf/nan gradients, the weights and so the next losses would be NaN (logged as null).
    assert all(r["loss"] == pytest.approx(math.log(50304), abs=1e-3) for r in rows[1:])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
