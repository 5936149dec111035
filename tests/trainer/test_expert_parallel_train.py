"""`titanforge train --nproc 2 configs/jamba-tiny.yaml parallel.ep=2` against one process.

A tiny Jamba (2 layers "MD AE": Mamba + dense, attention + MoE of 4 experts, top-2), 6 steps of
8 sequences of the default corpus at 64 tokens. One process takes the global batch as two
accumulated micro-batches (the MoE auxiliary losses per micro-batch, as per rank under expert
parallelism); the 2-process runs hold 2 experts per rank, DDP or FSDP2 for the rest.

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


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_ep2_training_matches_one_process(shakespeare64, one_process, tmp_path, backend):
    proc = lu.run(CONFIG, _overrides(shakespeare64, tmp_path, **{"parallel.ep": 2, "parallel.dp_backend": backend}),
                  nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    two = lu.losses(tmp_path)
    assert sorted(one_process) == sorted(two) == list(range(1, STEPS + 1))
    for step in one_process:
        assert two[step] == pytest.approx(one_process[step], rel=1e-5), (backend, step)
    # The loss moved: equality is not two runs that both did nothing.
    assert one_process[STEPS] < one_process[1] - 0.05
