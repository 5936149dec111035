"""`titanforge train --nproc 2 configs/jamba-tiny.yaml parallel.ep=2` against one process.

A tiny Jamba (2 layers "MD AE": Mamba + dense, attention + MoE of 4 experts, top-2), 6 steps of
8 sequences of the default corpus at 64 tokens. One process takes the global batch as two
accumulated micro-batches (the MoE auxiliary losses per micro-batch, as per rank under expert
parallelism); the 2-process run holds 2 experts per rank, DDP for the rest (FSDP2 with EP is
checked through `parallelize` in tests/parallel/test_expert_parallel.py; a third ~20 s launch
here would only repeat it). Its step-3 checkpoint then resumes in one process.

Tolerance: 1e-5 relative per step's loss, float32 (as tests/trainer/test_train_e2e.py): only the
summation order differs (all-to-all, gradient all-reduce), compounded over 6 AdamW steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testutil import launch_util as lu

pytestmark = pytest.mark.slow

CONFIG = "configs/jamba-tiny.yaml"
STEPS = 6


def _overrides(data: Path, out: Path, **extra) -> list[str]:
    base = {"data.path": data, "output_dir": out, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
            "model.n_kv_heads": 1, "model.ffn_hidden": 64, "model.max_seq_len": 64,
            "model.jamba.layer_pattern": "MD AE", "model.jamba.moe.n_experts": 4, "model.jamba.moe.top_k": 2,
            "model.jamba.moe.z_loss_coef": 1e-3, "train.global_batch_size": 8, "train.micro_batch_size": 4,
            "train.steps": STEPS, "train.val_every": STEPS, "train.val_batches": 1, "optim.warmup_steps": 2,
            "checkpoint.enabled": False, "wandb.mode": "disabled"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def one_process(shakespeare64, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("ep_one")
    proc = lu.run(CONFIG, _overrides(shakespeare64, out), nproc=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return lu.losses(out)


@pytest.fixture(scope="module")
def ep_run(shakespeare64, tmp_path_factory) -> Path:
    """ep=2 with DDP for the rest, checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("ep_ddp")
    extra = {"parallel.ep": 2, "checkpoint.enabled": True, "checkpoint.every": 3, "checkpoint.keep_last": 2}
    proc = lu.run(CONFIG, _overrides(shakespeare64, out, **extra), nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_ep2_training_matches_one_process(one_process, ep_run):
    two = lu.losses(ep_run)
    assert sorted(one_process) == sorted(two) == list(range(1, STEPS + 1))
    for step in one_process:
        assert two[step] == pytest.approx(one_process[step], rel=1e-5), step
    # The loss moved: equality is not two runs that both did nothing.
    assert one_process[STEPS] < one_process[1] - 0.05


def test_ep2_checkpoint_resumes_in_one_process(shakespeare64, ep_run, tmp_path):
    """Saved at step 3 with ep=2 (experts sharded over 2 ranks), resumed by one process: steps 4-6
    give the ep=2 run's losses (1e-5): the DCP checkpoint reshards the experts."""
    import shutil

    shutil.copytree(ep_run / "checkpoints", tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / f"step_{STEPS:08d}")
    proc = lu.run(CONFIG, _overrides(shakespeare64, tmp_path, **{"checkpoint.enabled": True,
                                                                 "checkpoint.every": 3}), nproc=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[resume] from" in proc.stdout and "step_00000003" in proc.stdout
    resumed, ref = lu.losses(tmp_path), lu.losses(ep_run)
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(ref[step], rel=1e-5), step
