"""Create the project's virtual environment with nothing but the standard library.

`make setup` (and so `make demo` / `make test` / `.ci/run`) runs this with the system Python.
It creates `.venv/`, installs torch first, then the package with its extras, and writes a
stamp so a second call is instant.

Torch: a bare `pip install torch` on Linux pulls a multi-GB CUDA build. We ask for
`torch==$TITANFORGE_TORCH` (default 2.13.0). On a CPU-only machine we first try the
`+cpu` local build (present on this project's machines and on the PyTorch CPU index); on a
GPU machine (nvidia-smi present) the PyPI wheel is the CUDA build, which is what you want.
Override with TITANFORGE_TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or any index).
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


def _py() -> Path:
    return VENV / "bin" / "python"


def _pip(*args: str) -> None:
    cmd = [str(_py()), "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def _stamp_key() -> str:
    h = hashlib.sha256()
    h.update((ROOT / "pyproject.toml").read_bytes())
    h.update(f"{EXTRAS}|{TORCH_VERSION}|{os.environ.get('TITANFORGE_TORCH_INDEX', '')}".encode())
    return h.hexdigest()


def _install_torch() -> None:
    index = os.environ.get("TITANFORGE_TORCH_INDEX")
    if index:
        _pip("install", f"torch=={TORCH_VERSION}", "--index-url", index)
        return
    has_gpu = shutil.which("nvidia-smi") is not None
    if not has_gpu:
        try:
            _pip("install", f"torch=={TORCH_VERSION}+cpu")
            return
        except subprocess.CalledProcessError:
            print(f"torch=={TORCH_VERSION}+cpu not found locally; trying the PyTorch CPU index", flush=True)
        try:
            _pip("install", f"torch=={TORCH_VERSION}",
                 "--index-url", "https://download.pytorch.org/whl/cpu")
            return
        except subprocess.CalledProcessError:
            print("PyTorch CPU index unreachable; falling back to the package registry", flush=True)
    _pip("install", f"torch=={TORCH_VERSION}")


def main() -> int:
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
    _pip("install", "-e", spec)
    stamp.write_text(_stamp_key())
    print(f"environment ready: {VENV}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
