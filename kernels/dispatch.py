"""The one rule that picks an op's implementation: CUDA tensors -> Triton, CPU -> C loop, else PyTorch.

Every op with a fast path asks `pick(op, backend, x, *others, native_source=...)` and runs what it
answers:

- "triton": the op's `kernels/<op>/triton.py` kernels. "auto" picks them for CUDA tensors of a
  float dtype when triton imports; forced ("triton"), they also run CPU tensors under
  `TRITON_INTERPRET=1` (how the tests exercise them without a GPU).
- "native": the C loop (kernels/native.py): "auto" picks it for CPU float32/float64 where it builds
  and torch.compile is not tracing.
- "torch": the plain-PyTorch path (any device and dtype, DTensors, torch.compile).

Tensor subclasses (DTensor under tensor parallelism) take the PyTorch path under "auto": neither a
Triton launch nor a C loop may read their data_ptr(); the parallel code passes local shards where it
wants the fast path.

Debugging override, per op: `model.kernels.<op>=torch|triton|native|auto` in the job config
(`set_overrides`, applied when the model is built) or the environment variable
`TITANFORGE_KERNELS="rms_norm=torch,selective_scan=triton"` (`*` names every op); the config wins
over the environment, and an explicit backend passed to an op wins over both.
"""

from __future__ import annotations

import collections
import importlib.util
import os

import torch

from titanforge.kernels import native

BACKENDS = ("auto", "triton", "native", "torch")
# Ops that consult this rule; an override naming anything else is a typo.
OPS = ("rms_norm", "linear_cross_entropy", "causal_conv", "selective_scan", "ssd", "moe_permute", "ttt_linear",
       "ttt_mlp", "titans_memory")

_config_overrides: dict[str, str] = {}
# (op, path) -> how many calls took it in this process: lets a test see which kernels ran.
counts: collections.Counter = collections.Counter()


def _check(op: str, backend: str, where: str) -> None:
    if op != "*" and op not in OPS:
        raise ValueError(f"{where}: unknown kernel op {op!r}; the ops are {list(OPS)} (or '*' for all)")
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend {backend!r} for {op!r} is not one of {list(BACKENDS)}")


def parse_overrides(text: str) -> dict[str, str]:
    """'op=backend,op=backend' (the TITANFORGE_KERNELS form) -> {op: backend}, checked."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"TITANFORGE_KERNELS: {item!r} is not op=backend (e.g. rms_norm=torch)")
        op, backend = (s.strip() for s in item.split("=", 1))
        _check(op, backend, "TITANFORGE_KERNELS")
        out[op] = backend
    return out


def check_overrides(mapping: dict[str, str] | None) -> None:
    """Raise ValueError naming the first unknown op or backend of a {op: backend} mapping."""
    for op, backend in (mapping or {}).items():
        _check(op, backend, f"model.kernels.{op}")


def set_overrides(mapping: dict[str, str] | None) -> None:
    """Replace the config's per-op overrides ({op: backend}; '*' for every op)."""
    mapping = dict(mapping or {})
    check_overrides(mapping)
    _config_overrides.clear()
    _config_overrides.update(mapping)


def overrides() -> dict[str, str]:
    """The per-op overrides in force: the environment's, then the config's on top."""
    out = parse_overrides(os.environ.get("TITANFORGE_KERNELS", ""))
    out.update(_config_overrides)
    return out


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Found, not imported: a CPU run never pays triton's import (the kernels import it on first use).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_FOUND


def triton_runs(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on x's device here: CUDA, or any CPU tensor in the interpreter."""
    return triton_importable() and (x.device.type == "cuda" or (interpreting() and x.device.type == "cpu"))


def resolve(op: str, backend: str = "auto") -> str:
    """The backend asked for: an explicit one as given, "auto" replaced by an override if any."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r}: expected one of {list(BACKENDS)}")
    if backend != "auto":
        return backend
    ov = overrides()
    return ov.get(op, ov.get("*", "auto"))


def pick(op: str, backend: str, x: torch.Tensor, *others, native_source: str | None = None,
         triton_dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> str:
    """The path op takes on x (see _pick for the rule), counted in `counts`."""
    path = _pick(op, backend, x, *others, native_source=native_source, triton_dtypes=triton_dtypes)
    counts[op, path] += 1
    return path


def _pick(op: str, backend: str, x: torch.Tensor, *others, native_source: str | None = None,
          triton_dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> str:
    """'triton', 'native' or 'torch' for op on x (and its other tensor operands, None allowed).

    backend "auto" follows the rule in the module docstring; "triton" and "native" are demands that
    raise with the reason where they cannot run; "torch" is always granted. `native_source` is the
    op's C file (None: the op has no C loop; "native" then falls to "torch" under "auto")."""
    backend = resolve(op, backend)
    is_plain = native.plain(x, *others)
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_importable():
            raise RuntimeError(f"{op}: backend='triton' but triton does not import (pip install triton, or use "
                               f"backend='auto')")
        if not triton_runs(x):
            raise ValueError(f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones), got "
                             f"{x.device.type}")
        if x.dtype not in triton_dtypes:
            raise ValueError(f"{op}: backend='triton' runs {[str(d) for d in triton_dtypes]}, got {x.dtype} (cast, or "
                             f"use backend='auto')")
        if not is_plain:
            raise ValueError(f"{op}: backend='triton' takes plain tensors, not {type(x).__name__}: pass .to_local() "
                             f"shards or use backend='auto'")
        return "triton"
    if backend == "native":
        if native_source is None:
            raise ValueError(f"{op}: has no C loop; use backend 'auto', 'triton' or 'torch'")
        native.use_native("native", x, native_source, op, *others)  # raises with the reason
        return "native"
    # auto
    if x.device.type == "cuda" and is_plain and x.dtype in triton_dtypes and triton_importable():
        return "triton"
    if native_source is not None and native.use_native("auto", x, native_source, op, *others):
        return "native"
    return "torch"
