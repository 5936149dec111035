"""Throughput figures for the log line: peak FLOP/s per device, MFU and peak memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

import torch

# Dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets, SXM parts).
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_flops(device: torch.device, configured_tflops: float = 0.0) -> float:
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return 100e12
    # A rough CPU ceiling: every core retiring two 8-wide fp32 FMAs per cycle at 2 GHz.
    return (os.cpu_count() or 1) * 2.0e9 * 32


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
