"""`titanforge compare RUN_DIR [RUN_DIR ...]`: the validation losses of finished runs side by side.

Reads each run's `metrics.jsonl` (written by the trainer into its output_dir) and prints one row per
validation step that every run reached, one column per run (named by its directory), then a line
with the last common step. `make demo` ends with it: Titans MAC beside Llama at the same steps.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def val_losses(run_dir: Path) -> dict[int, float]:
    """{step: validation loss} of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the output_dir of a run that has finished at least one "
                                f"validation (train.val_every)")
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "val_loss" in row:
            out[int(row["step"])] = float(row["val_loss"])
    return out


def compare_table(runs: dict[str, dict[int, float]]) -> list[str]:
    """Lines of the side-by-side table over the validation steps every run has."""
    common = sorted(set.intersection(*(set(v) for v in runs.values())))
    if not common:
        raise ValueError("the runs share no validation step; give them the same train.val_every and steps")
    names = list(runs)
    width = max(12, *(len(n) for n in names))
    lines = ["val loss".ljust(10) + "".join(n.rjust(width + 2) for n in names)]
    for step in common:
        lines.append(f"step {step:<5d}" + "".join(f"{runs[n][step]:{width + 2}.4f}" for n in names))
    last = common[-1]
    best = min(names, key=lambda n: runs[n][last])
    ppl = ", ".join(f"{n} {math.exp(runs[n][last]):.1f}" for n in names)
    lines.append(f"[compare] step {last}: lowest validation loss {best} (perplexity {ppl})")
    return lines


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="titanforge compare", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="output_dir of each run")
    args = p.parse_args(argv)
    try:
        table = compare_table({r.name or str(r): val_losses(r) for r in args.runs})
    except (FileNotFoundError, ValueError) as e:
        print(f"titanforge compare: {e}")
        return 2
    print("\n".join(table))
    return 0
