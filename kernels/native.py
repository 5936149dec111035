"""Build and load the C kernels that run the hot loops on CPU (the Triton kernels' CPU counterpart).

A kernel's C source (`kernels/<op>/csrc/*.c`, plain C99 + OpenMP, no torch headers, so it compiles
in about a second) is compiled on first use with the system C compiler into a shared library and
called through `ctypes` with raw pointers of contiguous tensors. The library is cached under
`$TITANFORGE_CACHE_DIR` (default `~/.cache/titanforge`) in a directory named by a hash of the
source, the flags, the compiler's version and this CPU's instruction-set flags: `-march=native`
code is only ever loaded on the kind of CPU it was built for. Builds write to a temporary file and
rename it into place, so concurrent ranks of one job can build at once.

No compiler (or `TITANFORGE_NATIVE=0`): `load` returns None with the reason, and callers run
their plain-PyTorch path (same results, slower); `native_status()` says which is in use.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

# -fno-trapping-math: without it gcc will not vectorise floorf (the exp2 of the scans).
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=gnu99"]

# Headers every kernel may include (exp2.h).
SHARED_INCLUDE = Path(__file__).with_name("csrc")

_failures: dict[str, str] = {}


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc) or shutil.which("gcc")


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none); trainer/perf.py
    reads its flags, model name and clock from here too."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _cpu_flags() -> str:
    """The instruction-set flags (x86 `flags`, Arm `Features`), else platform.processor()."""
    info = cpuinfo()
    return info.get("flags") or info.get("Features") or platform.processor()


def cflags() -> list[str]:
    # gcc's -march=native keeps 256-bit vectors on AVX-512 CPUs; the scan loops run ~1.3x faster
    # with 512-bit ones (measured on a Xeon; no frequency penalty showed at one or two threads).
    wide = ["-mprefer-vector-width=512"] if "avx512f" in _cpu_flags().split() else []
    return CFLAGS + wide


def cache_dir() -> Path:
    return Path(os.environ.get("TITANFORGE_CACHE_DIR", Path.home() / ".cache" / "titanforge")) / "native"


def _library_dir() -> Path:
    """The cache directory, or this user's temp dir where it cannot be created (a read-only home
    on a cluster)."""
    for d in (cache_dir(), Path(tempfile.gettempdir()) / f"titanforge-native-{os.getuid()}"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            return d
        except OSError:
            continue
    raise OSError(f"neither {cache_dir()} nor the temp dir can hold the built C kernels; set TITANFORGE_CACHE_DIR")


@functools.lru_cache(maxsize=None)
def load(source: str) -> ctypes.CDLL | None:
    """The compiled library of `source` (a path to a .c file), or None where it cannot be built."""
    if os.environ.get("TITANFORGE_NATIVE", "1") == "0":
        _failures[source] = "disabled by TITANFORGE_NATIVE=0"
        return None
    cc = _compiler()
    if cc is None:
        _failures[source] = "no C compiler found (set CC, or install gcc)"
        warnings.warn(f"titanforge: {_failures[source]}; {Path(source).name} runs its slower PyTorch path")
        return None
    # The source and the headers it can include (beside it and the shared ones), so editing a
    # header rebuilds.
    headers = sorted(Path(source).parent.glob("*.h")) + sorted(SHARED_INCLUDE.glob("*.h"))
    text = b"".join(f.read_bytes() for f in [Path(source), *headers])
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    flags = cflags()
    key = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), version.encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    out = _library_dir() / f"{Path(source).stem}-{key}.so"
    if not out.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        proc = subprocess.run([cc, *flags, f"-I{SHARED_INCLUDE}", "-o", tmp, source, "-lm"], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            _failures[source] = f"{cc} failed: {proc.stderr.strip()[-2000:]}"
            warnings.warn(f"titanforge: building {Path(source).name} failed, its slower PyTorch path runs "
                          f"instead:\n{_failures[source]}")
            return None
        os.replace(tmp, out)
    try:
        return ctypes.CDLL(str(out))
    except OSError as e:  # built but unloadable (an unresolved symbol): the PyTorch path runs
        _failures[source] = f"loading {out.name} failed: {e}"
        warnings.warn(f"titanforge: {_failures[source]}; {Path(source).name} runs its slower PyTorch path")
        return None


def native_status(source: str) -> str:
    """'native' when `source` is built and loaded, else why not."""
    return "native" if load(source) is not None else _failures.get(source, "unavailable")


BACKENDS = ("auto", "native", "torch")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected 'auto', 'native' or 'torch'")


def plain(*tensors) -> bool:
    """Whether every tensor given (None skipped) is a plain tensor with its own storage. A tensor
    subclass (DTensor under tensor/sequence parallelism, FakeTensor, ...) holds its data elsewhere
    or nowhere: its data_ptr() is not memory a C loop may read."""
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def use_native(backend: str, x: torch.Tensor, source: str, what: str, *others) -> bool:
    """Whether an op offered with `backend` runs its C loop (`source`) on x: "torch" never, "native"
    always (raising if x is not CPU float32/float64 or the loop cannot be built), "auto" where x
    is CPU float32/float64, the loop builds and torch.compile is not tracing. x and `others` (the
    op's other tensor operands, None allowed) must be plain tensors, not DTensors or other
    subclasses: "auto" takes the PyTorch path for those, "native" refuses them."""
    check_backend(backend)
    if backend == "torch":
        return False
    fits = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    is_plain = plain(x, *others)
    if backend == "native":
        if not fits:
            raise ValueError(f"backend='native' runs CPU float32/float64 only, got {x.device.type} {x.dtype}")
        if not is_plain:
            kinds = sorted({type(t).__name__ for t in (x, *others) if t is not None})
            raise ValueError(f"backend='native' takes plain tensors, got {kinds}: a C loop cannot read a "
                             f"tensor subclass such as DTensor (use backend='auto' or 'torch', or pass "
                             f".to_local() shards)")
        if load(source) is None:
            raise RuntimeError(f"backend='native': the C {what} is unavailable ({native_status(source)})")
        return True
    return fits and is_plain and not torch.compiler.is_compiling() and load(source) is not None


def kernel(source: str, name: str, dtype: torch.dtype):
    """The C function `name` of `source` for dtype (its _f32 or _f64 variant)."""
    return getattr(load(source), f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def check_inputs(name: str, *tensors) -> None:
    """The C kernels read raw float32/float64 CPU memory of one dtype: refuse anything else."""
    ts = [t for t in tensors if t is not None]
    dtypes = {t.dtype for t in ts}
    if any(t.device.type != "cpu" for t in ts) or len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
        raise ValueError(f"{name}: the C kernel takes CPU tensors of one dtype, float32 or float64; got "
                         f"{sorted({(t.device.type, str(t.dtype)) for t in ts})} (cast them, or use backend='torch')")


def ptr(t) -> ctypes.c_void_p:
    """Raw pointer of a contiguous tensor (None -> NULL)."""
    return ctypes.c_void_p(None if t is None else t.data_ptr())
