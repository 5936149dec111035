"""Metrics out of the training loop: one log line per step, a JSONL file, and W&B (rank 0 only).

W&B is offline by default (`wandb sync <output_dir>/wandb/offline-run-*` uploads later); the run
id is kept in every checkpoint so a resumed job continues the same run. Offline, W&B writes a
new folder per restart with the same id and `wandb sync` replays them in order. All W&B files
(and its cache/config) stay inside the output directory, never in $HOME.

Exactly once across crashes and resumes:
- `metrics.jsonl` gets every row at once (flushed; fsync'd at each checkpoint). A run that
  resumes from step S first drops the rows after S (steps a crash lost, about to be replayed) and
  writes a `{"event": "resume", "step": S}` marker, so each step appears once.
- W&B rows are held back until a checkpoint at or after their step commits (`commit`), then
  logged; a SIGKILL loses from W&B at most the steps since the last checkpoint, which the resumed
  run replays and logs once. On resume the offline runs of the same id are read back: steps up to
  S that never reached W&B (killed before its writer flushed them) are logged from
  `metrics.jsonl`, and steps W&B already holds (a run that resumed from an older checkpoint than
  its last commit, e.g. after a corrupt newest one) are not logged again.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from titanforge.trainer.config import WandbConfig


def format_line(step: int, m: dict[str, Any]) -> str:
    parts = [f"step {step:>6d}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}",
             f"tok/s {m['tokens_per_s']:,.0f}", f"mfu {100 * m['mfu']:.2f}%", f"mem {m['peak_mem_gib']:.2f}GiB"]
    if m.get("corrupt_shards") or m.get("skipped_samples"):
        parts.append(f"data skipped {m.get('corrupt_shards', 0)} shard(s) / {m.get('skipped_samples', 0)} samples")
    if m.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)


def _rewrite_jsonl(path: Path, keep_upto: int, marker: dict) -> list[dict]:
    """Keep the rows of steps <= keep_upto, append `marker`, atomically; return the kept rows.
    The rows taken out (steps about to be replayed, or a whole earlier run on a fresh start) go to
    metrics.dropped.jsonl: nothing logged is lost."""
    rows, dropped = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half line a killed process left
            if isinstance(row, dict) and row.get("step", 0) <= keep_upto:
                rows.append(row)
            elif isinstance(row, dict):
                dropped.append(row)
    if dropped:
        with open(path.with_name("metrics.dropped.jsonl"), "a") as f:
            for row in dropped:
                f.write(json.dumps({**row, "dropped_at": marker["time"]}) + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for row in rows + [marker]:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return rows


def _merge_by_step(rows: list[dict]) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for row in rows:
        if "event" in row or "step" not in row:
            continue
        merged.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if k != "step"})
    return merged


class Tracker:
    def __init__(self, output_dir: str | Path, cfg: WandbConfig, *, enabled: bool, run_id: str | None,
                 config: dict, resume_step: int = 0, resumed_from: str | None = None):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.run = None
        self.run_id = run_id
        self._pending: dict[int, dict] = {}
        self._in_wandb: set[int] = set()
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        marker = {"event": "resume" if resumed_from else "start", "step": resume_step,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if resumed_from:
            marker["from"] = resumed_from
        kept = _rewrite_jsonl(self.dir / "metrics.jsonl", resume_step, marker)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        if cfg.mode == "disabled":
            return
        wandb_dir = self.dir / "wandb"
        wandb_dir.mkdir(exist_ok=True)
        for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", ".cache"), ("WANDB_CONFIG_DIR", ".config"),
                         ("WANDB_DATA_DIR", ".data"), ("WANDB_ARTIFACT_DIR", ".artifacts")):
            os.environ.setdefault(var, str(self.dir / sub) if sub else str(self.dir))
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        # Our own id (W&B accepts any [a-z0-9]{8}); it is saved in every checkpoint for resume.
        self.run_id = run_id or secrets.token_hex(4)
        if run_id is not None and cfg.mode == "offline":
            from titanforge.trainer.wandb_file import logged_steps

            for f in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
                self._in_wandb.update(logged_steps(f))
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, tags=cfg.tags or None,
                              id=self.run_id, resume="allow", mode=cfg.mode, dir=str(self.dir), config=config)
        if run_id is not None and cfg.mode == "offline":
            # Steps up to the resume point that a killed run never got into W&B.
            for step, row in sorted(_merge_by_step(kept).items()):
                if step not in self._in_wandb:
                    self._pending[step] = row
            self.commit(resume_step)

    @property
    def wandb_dir(self) -> str | None:
        # run.dir is the run's files/ folder; its parent holds run-<id>.wandb.
        return str(Path(self.run.dir).parent) if self.run is not None else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self.run is not None and step not in self._in_wandb:
            self._pending.setdefault(step, {}).update(metrics)

    def commit(self, step: int) -> None:
        """A checkpoint of `step` is on disk: rows up to it are final; log them to W&B."""
        if not self.enabled:
            return
        self.jsonl.flush()
        os.fsync(self.jsonl.fileno())
        if self.run is None:
            return
        import wandb

        for s in sorted(k for k in self._pending if k <= step):
            row = self._pending.pop(s)
            payload = {k: (wandb.Histogram(v) if isinstance(v, (list, tuple)) else v) for k, v in row.items()}
            self.run.log(payload, step=s)
            self._in_wandb.add(s)

    def finish(self, clean: bool = True) -> None:
        """`clean`: the run ended by itself (done, preempted, non-finite stop): every row so far is
        final. Otherwise (an exception) rows after the last checkpoint stay out of W&B; the run
        that resumes replays and logs them."""
        if not self.enabled:
            return
        if clean and self._pending:
            self.commit(max(self._pending))
        self.jsonl.close()
        if self.run is not None:
            self.run.finish()
