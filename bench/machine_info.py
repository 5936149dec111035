"""What every benchmark records about the machine it ran on (imported by the scripts beside it)."""

from __future__ import annotations

import platform
import subprocess


def cpu_model() -> str:
    """The CPU's model name from lscpu, else platform.processor() (no lscpu, or no such line)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    return name or platform.processor() or "?"
