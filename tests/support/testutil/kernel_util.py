"""Helpers the kernel and model tests share: the relative-RMS error, NaN-poisoned allocations, and
running a function under several intra-op thread counts."""

from __future__ import annotations

import contextlib

import torch


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_rms / ||b||_rms (b the reference), computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


@contextlib.contextmanager
def poisoned_empty():
    """Deterministic mode fills torch.empty* outputs with NaN, so an element a kernel forgets to
    write fails the comparison instead of passing on leftover memory."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def on_threads(fn, counts=(1, 2)) -> list:
    """fn() under each intra-op thread count in turn (the caller's count restored after)."""
    threads = torch.get_num_threads()
    try:
        out = []
        for n in counts:
            torch.set_num_threads(n)
            out.append(fn())
        return out
    finally:
        torch.set_num_threads(threads)
