"""Preemption: SIGTERM / SIGUSR1 (SLURM's --signal) ask every rank to save and exit cleanly.

The handler only sets a flag; once per step all ranks agree on it with a MAX all-reduce, so they
stop at the same step and write one consistent checkpoint.
"""

from __future__ import annotations

import signal
import threading

import torch

from titanforge.trainer.dist import all_reduce


class PreemptionWatcher:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device)
        return bool(all_reduce(flag, op=torch.distributed.ReduceOp.MAX).item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
