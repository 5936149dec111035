"""Preemption: SIGTERM / SIGUSR1 (SLURM's --signal) ask every rank to save and exit cleanly.

The handler only sets a flag; once per step all ranks agree on it with a MAX all-reduce, so they
stop at the same step and write one consistent checkpoint.

`catch_early()` (called first thing by a rank's entry point) records a signal that arrives while
the rank is still importing or building, so it is not lost: the watcher starts with it set. The
`titanforge train` launcher starts torchrun with these signals ignored (torchrun would otherwise
kill the ranks and exit 1 with a traceback); it forwards them to the ranks itself.
"""

from __future__ import annotations

import signal
import threading

import torch

from titanforge.trainer.dist import all_reduce


SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_early: list[int] = []


def _early_handler(signum, frame) -> None:
    _early.append(signum)


def catch_early() -> None:
    """Record preemption signals from now on (until a PreemptionWatcher takes over)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _early_handler)


class PreemptionWatcher:
    SIGNALS = SIGNALS

    def __init__(self):
        self.received: int | None = _early[-1] if _early else None
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
