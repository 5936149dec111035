"""Run every benchmark in bench/ one after another; each writes its own bench/results/*.json.

    .venv/bin/python bench/run_all.py [name ...]     e.g. `bench/run_all.py titans jamba`

The peers some benchmarks measure against come from the `bench` extra:
`.venv/bin/pip install -e '.[dev,bench]'` (fla-core with --no-deps if pip wants another torch).
Benchmarks are never part of the test suite: they take minutes and report ratios against a
reference measured in the same process.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["data_loader", "train_step", "moe_dispatch", "mamba_kernels", "ttt", "jamba", "titans", "parallel_layouts"]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        t0 = time.time()
        print(f"== bench/{name}.py", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / f"{name}.py")], cwd=HERE.parent)
        print(f"== bench/{name}.py: exit {rc} in {time.time() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
