"""Create the project's virtual environment with nothing but the standard library.

`make setup` (and so `make demo` / `make test` / `.ci/run`) runs this with the system Python.
It creates `.venv/`, installs torch first, then the package with its extras, and writes a
stamp so a second call is instant.

Torch: a bare `pip install torch` on Linux pulls a multi-GB CUDA build. We ask for
`torch==$TITANFORGE_TORCH` (default 2.13.0). On a CPU-only machine we first try the
`+cpu` local build (present on this project's machines and on the PyTorch CPU index); on a
GPU machine (nvidia-smi present) the PyPI wheel is the CUDA build, which is what you want.
Override with TITANFORGE_TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or any index).

Everything else installs at the versions CI last passed with: `locks/py3.X.txt` (a pip constraints
file for this Python minor; torch is pinned above, not there) constrains every package the tests,
demo and benchmarks import. The package's own dependencies stay ranges for `pip install titanforge`.
`python3 launch/bootstrap.py --lock` (`make lock`) builds a scratch environment with the newest
versions in range, writes them to the lock, and `make lock` then runs the tests against it: moving
forward is a deliberate step. Without a lock for the running Python, the ranges are used (with a
warning).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("TITANFORGE_VENV", ROOT / ".venv"))
EXTRAS = os.environ.get("TITANFORGE_EXTRAS", "dev")
TORCH_VERSION = os.environ.get("TITANFORGE_TORCH", "2.13.0")
LOCK = ROOT / "locks" / f"py{sys.version_info.major}.{sys.version_info.minor}.txt"
# The extras a lock covers: tests (dev) and benchmarks' peers (bench).
LOCK_EXTRAS = "dev,bench"
# Installed by this script or by pip itself, never pinned in the lock.
UNLOCKED = ("torch", "titanforge", "pip", "setuptools", "wheel", "nvidia-", "cuda-")


def _py() -> Path:
    return VENV / "bin" / "python"


def _pip(*args: str, py: Path | None = None) -> None:
    cmd = [str(py or _py()), "-P", "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def _stamp_key() -> str:
    h = hashlib.sha256()
    h.update((ROOT / "pyproject.toml").read_bytes())
    h.update(LOCK.read_bytes() if LOCK.exists() else b"no lock")
    h.update(f"{EXTRAS}|{TORCH_VERSION}|{os.environ.get('TITANFORGE_TORCH_INDEX', '')}".encode())
    return h.hexdigest()


def _install_torch(py: Path | None = None) -> None:
    index = os.environ.get("TITANFORGE_TORCH_INDEX")
    if index:
        _pip("install", f"torch=={TORCH_VERSION}", "--index-url", index, py=py)
        return
    has_gpu = shutil.which("nvidia-smi") is not None
    if not has_gpu:
        try:
            _pip("install", f"torch=={TORCH_VERSION}+cpu", py=py)
            return
        except subprocess.CalledProcessError:
            print(f"torch=={TORCH_VERSION}+cpu not found locally; trying the PyTorch CPU index", flush=True)
        try:
            _pip("install", f"torch=={TORCH_VERSION}",
                 "--index-url", "https://download.pytorch.org/whl/cpu", py=py)
            return
        except subprocess.CalledProcessError:
            print("PyTorch CPU index unreachable; falling back to the package registry", flush=True)
    _pip("install", f"torch=={TORCH_VERSION}", py=py)


def _constraints() -> list[str]:
    if LOCK.exists():
        return ["--constraint", str(LOCK)]
    print(f"warning: no lock for Python {sys.version_info.major}.{sys.version_info.minor} ({LOCK} is "
          f"missing): installing the newest versions in range; `make lock` writes one", flush=True)
    return []


def write_lock() -> int:
    """Install the newest versions in range into a scratch environment and write them to LOCK."""
    import datetime
    import platform

    scratch = ROOT / ".venv-lock"
    print(f"creating scratch environment {scratch} (newest versions in range)", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(scratch)
    py = scratch / "bin" / "python"
    _install_torch(py)
    _pip("install", f"{ROOT}[{LOCK_EXTRAS}]", py=py)
    frozen = subprocess.run([str(py), "-P", "-m", "pip", "freeze", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout.splitlines()
    pins = sorted((ln for ln in frozen if "==" in ln and not ln.lower().startswith(UNLOCKED)), key=str.lower)
    torch_line = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"],
                                check=True, capture_output=True, text=True).stdout.strip()
    LOCK.parent.mkdir(exist_ok=True)
    LOCK.write_text(
        f"# The versions `make setup` installs (a pip constraints file; launch/bootstrap.py).\n"
        f"# Written by `make lock` on {datetime.date.today()}: Python {platform.python_version()}, "
        f"torch {torch_line} (pinned by bootstrap.py, not here), extras [{LOCK_EXTRAS}].\n"
        + "\n".join(pins) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {LOCK} ({len(pins)} packages)", flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv == ["--lock"]:
        return write_lock()
    if argv:
        print("usage: bootstrap.py [--lock]", file=sys.stderr)
        return 2
    stamp = VENV / ".titanforge-stamp"
    if stamp.exists() and stamp.read_text() == _stamp_key():
        return 0
    if not _py().exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(VENV)
    # Check for an existing torch first: re-running setup must not reinstall a working build.
    have_torch = subprocess.call([str(_py()), "-c", "import torch"], stderr=subprocess.DEVNULL) == 0
    if not have_torch:
        _install_torch()
    spec = f"{ROOT}[{EXTRAS}]" if EXTRAS else str(ROOT)
    _pip("install", *_constraints(), "-e", spec)
    stamp.write_text(_stamp_key())
    print(f"environment ready: {VENV}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
