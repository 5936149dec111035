"""Throughput figures for the log line: peak FLOP/s per device, MFU and peak memory.

MFU divides the model FLOPs a rank runs per second by the peak of what that rank uses. On a GPU
the peak is the device's dense bf16 datasheet figure. On a CPU it is the rank's own share: its
intra-op threads x the FLOPs one core retires per cycle (vector width x 2 for FMA x 2 FMA units,
or the AMX tile rate for bfloat16) x the core clock. Virtual machines often report the base clock
while the cores run faster (here: 2.6 GHz reported, a single-thread fp32 GEMM reaching the rate of
3.4 GHz), so the clock is measured at start (a chain of dependent adds, one per cycle, about
60 ms) and the larger of that and the reported one is used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from titanforge.kernels.native import cpuinfo

# Dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets, SXM parts).
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


@dataclass(frozen=True)
class CpuPeak:
    flops: float          # FLOP/s of the threads counted
    threads: int
    flops_per_cycle: int  # per core, for the dtype
    clock_ghz: float
    how: str              # where the clock came from, for the [cpu] line

    def describe(self) -> str:
        return (f"peak {self.flops / 1e9:.0f} GFLOP/s = {self.threads} thread(s) x {self.flops_per_cycle} "
                f"FLOP/cycle x {self.clock_ghz:.2f} GHz ({self.how})")


def flops_per_cycle(flags: set[str], dtype: str = "float32") -> int:
    """Peak FLOPs one core retires per cycle. FMA counts 2; server cores with AVX-512 have two FMA
    units (assumed: the larger figure, so MFU errs low). AMX multiplies 16x32 bf16 tiles at 1024
    FMAs per cycle."""
    if dtype == "bfloat16":
        if "amx_bf16" in flags:
            return 2048
        if "avx512_bf16" in flags:
            return 128
    if "avx512f" in flags:
        return 16 * 2 * 2
    if "avx2" in flags and "fma" in flags:
        return 8 * 2 * 2
    if "avx" in flags:
        return 8 * 2
    return 4 * 2


def reported_clock_ghz(info: dict[str, str]) -> float:
    """The highest clock the OS reports: cpufreq's maximum, /proc/cpuinfo's MHz, the model name's
    '@ 2.10GHz'. 0 where none is known."""
    ghz = []
    try:
        ghz.append(int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6)
    except (OSError, ValueError):
        pass
    try:
        ghz.append(float(info.get("cpu MHz", "")) / 1e3)
    except ValueError:
        pass
    m = re.search(r"@\s*([0-9.]+)\s*GHz", info.get("model name", ""))
    if m:
        ghz.append(float(m.group(1)))
    return max(ghz, default=0.0)


def measured_clock_ghz(repeats: int = 5) -> float:
    """The clock a core runs at now, from a chain of dependent adds (kernels/csrc/clock_probe.c):
    the fastest of `repeats` timings of 40M cycles. 0 where the probe cannot run (not x86-64, no
    C compiler)."""
    from titanforge.kernels import native

    lib = native.load(str(Path(native.__file__).with_name("csrc") / "clock_probe.c"))
    if lib is None or not lib.clock_probe_supported():
        return 0.0
    lib.clock_probe_chain.argtypes = [ctypes.c_uint64]
    lib.clock_probe_chain.restype = ctypes.c_uint64
    n = 5_000_000
    lib.clock_probe_chain(n // 10)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        lib.clock_probe_chain(n)
        best = min(best, time.perf_counter() - t0)
    return 8 * n / best / 1e9


def calibrate_gemm_gflops(n: int = 1024, repeats: int = 10) -> float:
    """Best single-thread fp32 GEMM rate, GFLOP/s: n^3 matmuls, the fastest of `repeats`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 / best / 1e9


@functools.lru_cache(maxsize=None)
def _measured_clock(info_key: str) -> tuple[float, str]:
    ghz = measured_clock_ghz()
    if ghz > 0:
        return ghz, "measured running clock"
    gflops = calibrate_gemm_gflops()
    return gflops / 64, f"clock proven by a {gflops:.0f} GFLOP/s single-thread fp32 GEMM"


def cpu_peak(threads: int | None = None, dtype: str = "float32", *, measure: bool = True,
             info: dict[str, str] | None = None) -> CpuPeak:
    """The peak of `threads` cores (default: this process's intra-op threads) for `dtype`.

    The clock is the larger of the reported one and the one measured (a dependent-add chain on
    x86-64, else a GEMM at 64 FLOP/cycle): both can only read below the truth."""
    info = cpuinfo() if info is None else info
    flags = set(info.get("flags", "").split())
    threads = threads or torch.get_num_threads()
    fpc = flops_per_cycle(flags, dtype)
    reported = reported_clock_ghz(info)
    clock, how = reported, "reported clock"
    if measure:
        measured, what = _measured_clock(info.get("model name", ""))
        if measured > clock:
            clock, how = measured, f"{what}; reported {reported:.2f} GHz"
    if clock <= 0:
        clock, how = 2.0, "clock unknown, 2 GHz assumed"
    return CpuPeak(threads * fpc * clock * 1e9, threads, fpc, clock, how)


def peak_flops(device: torch.device, configured_tflops: float = 0.0, dtype: str = "float32") -> float:
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return 100e12
    return cpu_peak(dtype=dtype).flops


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the resident peak of this process.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process instead of returning it to the OS.

    By default glibc serves blocks over 32 MiB with fresh mmaps and trims the heap, so every
    step's activations are page-faulted in again (measured here: a fresh 64 MiB buffer costs
    ~42 ms, a reused one ~6 ms; about half of a 2 s Jamba step). Never trim (M_TRIM_THRESHOLD)
    and serve blocks below 1 GiB from the heap (M_MMAP_THRESHOLD). Returns False where the C
    library is not glibc. The cost: memory freed by the process stays mapped to it.
    """
    name = ctypes.util.find_library("c")
    if not name or not hasattr(os, "confstr"):
        return False
    try:
        if "glibc" not in os.confstr("CS_GNU_LIBC_VERSION").lower():
            return False
        libc = ctypes.CDLL(name)
    except (OSError, ValueError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 2 << 30)) and bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30))
