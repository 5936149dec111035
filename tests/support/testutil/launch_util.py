"""Run `titanforge train` as a real subprocess (torchrun for --nproc > 1) and read its metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    # A W&B service this test process started (an in-process run) is not the job's to share.
    e.pop("WANDB_SERVICE", None)
    return e


def command(config: str, overrides: list[str], nproc: int = 1) -> list[str]:
    return [sys.executable, "-P", "-m", "titanforge.launch.cli", "train", str(ROOT / config), *overrides,
            "--nproc", str(nproc)]


# A 2-layer, 32-wide llama-tiny for 8 steps with checkpoints every 2: fast end-to-end runs.
TINY_LLAMA = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 2,
              "model.max_seq_len": 64, "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.steps": 8,
              "train.val_every": 4, "train.val_batches": 2, "optim.lr": 3e-3, "optim.warmup_steps": 2,
              "checkpoint.every": 2, "checkpoint.keep_last": 2}


def overrides(data: Path, out: Path, base: dict = TINY_LLAMA, **extra) -> list[str]:
    """`key=value` overrides: data path and output dir, then `base`, then `extra` (which wins)."""
    merged = {"data.path": data, "output_dir": out, **base, **extra}
    return [f"{k}={v}" for k, v in merged.items()]


def run(config: str, overrides: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(config, overrides, nproc), env=env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def start(config: str, overrides: list[str], nproc: int = 1) -> subprocess.Popen:
    """Start in a new process group, so the whole job (torchrun and its workers) can be killed."""
    return subprocess.Popen(command(config, overrides, nproc), env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(output_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (replayed after a crash) keeps its last value."""
    return {m["step"]: m["loss"] for m in metrics(output_dir) if "loss" in m}


def wait_for_step(proc: subprocess.Popen, output_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(losses(output_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"job exited with {proc.returncode} before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def kill_job(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def ranks(proc: subprocess.Popen) -> list:
    """The training ranks of a job started with `start` (not torchrun, whose command line names
    the module too)."""
    import psutil

    found = []
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []  # the job has ended
    for p in children:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "titanforge.launch.train" in cmd and "torch.distributed.run" not in cmd:
            found.append(p)
    return found
