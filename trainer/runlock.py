"""One run per output directory: `<output_dir>/run.lock`, taken by rank 0 before anything is written.

The lock file is created with O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+) and holds
who took it: host, pid, the process's start time (so a reused pid is not mistaken for the
holder), job id (SLURM_JOB_ID / TORCHELASTIC_RUN_ID), start time and the command. While the run
lives a thread touches the file every HEARTBEAT_S seconds.

A lock is stale when its holder is gone: on the same host, its pid no longer runs (or runs another
process); on another host (a shared filesystem across nodes, where pids cannot be checked), the
file has not been touched for STALE_S seconds. A stale lock is taken over with a message; a live
one refuses the run, naming the holder and the override (`checkpoint.break_lock=true`).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = "run.lock"
HEARTBEAT_S = 20.0
STALE_S = 180.0


class RunLockError(RuntimeError):
    """Another live run holds the output directory."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None where /proc has none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / LOCK_NAME
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = {}  # written half-way by a process killed in between: judged by its age alone
    holder["_age_s"] = time.time() - mtime
    return holder


def holder_alive(holder: dict) -> bool:
    if holder.get("host") == socket.gethostname() and "pid" in holder:
        pid = int(holder["pid"])
        if not _pid_alive(pid):
            return False
        start = _proc_start(pid)
        return start is None or holder.get("proc_start") in (None, start)
    return holder["_age_s"] < STALE_S


def describe(holder: dict) -> str:
    if "pid" not in holder:
        return f"an unreadable lock file touched {holder['_age_s']:.0f}s ago"
    job = f", job {holder['job_id']}" if holder.get("job_id") else ""
    return f"pid {holder['pid']} on {holder.get('host')}{job}, started {holder.get('started')}"


def check(output_dir: str | Path, break_lock: bool = False) -> None:
    """Raise RunLockError when a live run holds `output_dir` (the launcher's early check)."""
    holder = read_holder(output_dir)
    if holder is not None and not break_lock and holder_alive(holder):
        raise RunLockError(_refusal(output_dir, holder))


def _refusal(output_dir, holder: dict) -> str:
    return (f"output_dir {output_dir} is in use by another run ({describe(holder)}); wait for it to end, "
            f"choose another output_dir, or, if that run is really gone, take its lock over with "
            f"checkpoint.break_lock=true")


class RunLock:
    """Held by rank 0 from before the first write until the run returns."""

    def __init__(self, output_dir: str | Path, break_lock: bool = False):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.acquire(break_lock)

    def _content(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                           "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID"),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token,
                           "command": " ".join(sys.argv)[:500]})

    def acquire(self, break_lock: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_holder(self.dir)
                if holder is None:
                    continue
                if holder_alive(holder) and not break_lock:
                    raise RunLockError(_refusal(self.dir, holder)) from None
                why = "taking it over as asked (checkpoint.break_lock=true)" if holder_alive(holder) else \
                    "its process is gone"
                # Only one contender wins the rename; the others find no file and try again.
                try:
                    os.rename(self.path, self.dir / f"{LOCK_NAME}.stale-{self.token}")
                except FileNotFoundError:
                    continue
                os.unlink(self.dir / f"{LOCK_NAME}.stale-{self.token}")
                print(f"[lock] {self.path} was held by {describe(holder)}: {why}", flush=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self._content())
                f.flush()
                os.fsync(f.fileno())
            break
        else:
            raise RunLockError(f"could not take {self.path}: other runs keep taking it; start one run at a time")
        self._thread = threading.Thread(target=self._heartbeat, name="runlock-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass
