"""Throughput helpers: the allocator setting takes effect where the C library is glibc."""

import os

import torch

from titanforge.trainer.perf import keep_freed_memory, peak_flops, peak_memory_gib


def test_keep_freed_memory_on_glibc():
    glibc = hasattr(os, "confstr") and "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "").lower()
    assert keep_freed_memory() is glibc


def test_peak_figures_are_positive():
    assert peak_flops(torch.device("cpu")) == (os.cpu_count() or 1) * 2.0e9 * 32
    assert peak_flops(torch.device("cpu"), configured_tflops=3.0) == 3.0e12
    assert peak_memory_gib(torch.device("cpu")) > 0
