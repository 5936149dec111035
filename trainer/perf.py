"""Throughput figures for the log line: peak FLOP/s per device, MFU and peak memory."""

from __future__ import annotations

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
