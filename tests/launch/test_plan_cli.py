"""`titanforge plan` in one process: the arithmetic's fixed points and the command's messages.

(The estimates against measured memory of real runs: tests/parallel/test_plan.py.)
"""

from __future__ import annotations

from pathlib import Path

from titanforge.launch.cli import main
from titanforge.launch.config import load_config
from titanforge.launch.plan import plan

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_llama_8b_fits_8_gpus_not_one():
    cfg = load_config(CONFIGS / "llama-8b.yaml").model
    one = plan(cfg, gpus=1, gpu_mem_gb=80, global_batch=8, micro=1, seq_len=8192)
    # float32 weights + gradients + AdamW state alone are 16 bytes x 8.03B = 120 GiB.
    assert one and not any(fits for _, fits in one)
    assert min(est.params + est.grads + est.optim for est, _ in one) > 119 * 2**30
    eight = plan(cfg, gpus=8, gpu_mem_gb=80, global_batch=8, micro=1, seq_len=8192)
    fitting = [est for est, fits in eight if fits]
    assert fitting and eight[0][1]
    fsdp = [est for est, _ in eight if est.layout.engine == "fsdp" and est.layout.dp == 8]
    # FSDP over 8: a sixteenth of 16 bytes per parameter... times two = 15 GiB of state per GPU.
    assert abs((fsdp[0].params + fsdp[0].grads + fsdp[0].optim) / 2**30 - 16 * 8.03e9 / 8 / 2**30) < 0.5
    # Best first: fitting layouts sorted by the step-time estimate.
    times = [est.step_s for est in fitting]
    assert times == sorted(times)


def test_moe_layouts_include_expert_parallel():
    cfg = load_config(CONFIGS / "jamba-a1b-16e.yaml").model
    rows = plan(cfg, gpus=8, gpu_mem_gb=80, global_batch=64, micro=1, seq_len=4096)
    assert any(est.layout.ep == 8 for est, _ in rows)


def test_cli_prints_a_table_and_rejects_bad_flags(capsys):
    assert main(["plan", str(CONFIGS / "llama-1b.yaml"), "--gpus", "8", "--gpu-mem", "80", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "1,235.8M parameters" in out and "fits" in out
    assert main(["plan", str(CONFIGS / "llama-1b.yaml"), "--gpus", "6", "--gpu-mem", "80", "--nodes", "4"]) == 2
    assert "--gpus 6 must be a positive multiple of --nodes 4" in capsys.readouterr().err


def test_zero_layouts_need_the_whole_model_at_start():
    """ZeRO starts from the whole float32 model on every rank (no sharded start): Llama 1B (4.6 GiB)
    on 4 GiB GPUs does not fit under ZeRO-3 although its partitions would (3.3 GiB); FSDP2 does.
    With 8 GiB the whole model fits and ZeRO-3 does too."""
    cfg = load_config(CONFIGS / "llama-1b.yaml").model

    def dp8(mem):
        rows = plan(cfg, gpus=8, gpu_mem_gb=mem, global_batch=8, micro=1, seq_len=256, overhead_gb=0.0)
        return {est.layout.engine: (est, fits) for est, fits in rows if est.layout.dp == 8 and not est.layout.ac}

    small = dp8(4.0)
    zero3, fits = small["zero3"]
    assert zero3.total < 4.0 * 2**30 and not fits
    assert small["fsdp"][1]
    assert dp8(8.0)["zero3"][1]
