"""Metrics out of the training loop: one log line per step, a JSONL file, and W&B (rank 0 only).

W&B is offline by default (`wandb sync <output_dir>/wandb/offline-run-*` uploads later); the run
id is kept in every checkpoint so a resumed job continues the same run. Offline, W&B writes a
new folder per restart with the same id and `wandb sync` replays them in order. All W&B files
(and its cache/config) stay inside the output directory, never in $HOME.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from titanforge.trainer.config import WandbConfig


def format_line(step: int, m: dict[str, Any]) -> str:
    parts = [f"step {step:>6d}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}",
             f"tok/s {m['tokens_per_s']:,.0f}", f"mfu {100 * m['mfu']:.2f}%", f"mem {m['peak_mem_gib']:.2f}GiB"]
    if m.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)


class Tracker:
    def __init__(self, output_dir: str | Path, cfg: WandbConfig, *, enabled: bool, run_id: str | None,
                 config: dict):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.run = None
        self.run_id = run_id
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
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
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, tags=cfg.tags or None,
                              id=self.run_id, resume="allow", mode=cfg.mode, dir=str(self.dir), config=config)

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
        if self.run is not None:
            import wandb

            payload = {k: (wandb.Histogram(v) if isinstance(v, (list, tuple)) else v) for k, v in metrics.items()}
            self.run.log(payload, step=step)

    def finish(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.run is not None:
            self.run.finish()
