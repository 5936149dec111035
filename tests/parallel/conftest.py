"""The one 4-rank launch that tests/parallel/test_plan.py and test_sharded_init.py share
(tests/parallel/start_worker.py), run once per session when either needs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from memory_worker import BUDGET_MB  # noqa: E402


def torchrun_fixed_mmap(nproc: int, script: str, *args: str, mmap_threshold: int = 16384) -> None:
    """Launch tests/parallel/<script> with glibc's mmap threshold fixed (see start_worker.py)."""
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(HERE / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}
    proc = subprocess.run(cmd, cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


@pytest.fixture(scope="session")
def start_launch(tmp_path_factory) -> dict:
    """start_worker.py's results: "plan", "memory", "init", "seconds" (per phase, rank 0)."""
    out = tmp_path_factory.mktemp("start_launch") / "start.json"
    torchrun_fixed_mmap(4, "start_worker.py", str(BUDGET_MB), str(out))
    result = json.loads(out.read_text())
    print(f"start_worker.py phases (s): {result['seconds']}")
    return result
