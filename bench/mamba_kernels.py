"""Mamba kernels on CPU: the fused C loops against the plain-PyTorch paths they replace.

Forward + backward of (1) the Mamba-1 selective scan with its D skip and SiLU(z) gate
(`chunk_selective_scan`, backend "native" vs "torch": the cache-blocked PyTorch scan) and (2) the
short causal conv + SiLU (`causal_conv1d_silu`, "native" vs "torch"), at jamba-tiny's layer shape
(B = 1, D = 256 channels, N = 16 states, conv width 4) and T = 1k/4k, one and two threads. Both
paths of a kernel alternate in one process; the fastest of `--repeats` is kept. Reports
milliseconds and the ratio torch / native.

    .venv/bin/python bench/mamba_kernels.py [--lengths 1024 4096] [--threads 1 2] [--repeats 10]
writes bench/results/mamba_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from titanforge.kernels.mamba import causal_conv1d_silu, chunk_selective_scan

from machine_info import cpu_model  # bench/machine_info.py (this folder is sys.path[0])

ROOT = Path(__file__).resolve().parents[1]
B, D, N, K = 1, 256, 16, 4


def scan_case(T):
    g = torch.Generator().manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    leaves = dict(u=r(B, T, D), delta=torch.nn.functional.softplus(r(B, T, D) - 2), A=-torch.rand(D, N, generator=g) * 8,
                  B=r(B, T, N), C=r(B, T, N), D=r(D), z=r(B, T, D))
    leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}
    gy = r(B, T, D)

    def run(backend):
        y, _ = chunk_selective_scan(**leaves, backend=backend)
        y.backward(gy)
    return run


def conv_case(T):
    g = torch.Generator().manual_seed(T + 1)
    x = torch.randn(B, T, D, generator=g, requires_grad=True)
    w = torch.randn(D, 1, K, generator=g, requires_grad=True)
    b = torch.randn(D, generator=g, requires_grad=True)
    gy = torch.randn(B, T, D, generator=g)

    def run(backend):
        y, _ = causal_conv1d_silu(x, w, b, None, backend=backend)
        y.backward(gy)
    return run


def timed(fn, arg):
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "bench/results/mamba_kernels.json"))
    args = ap.parse_args()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for T in args.lengths:
            for name, case in (("selective_scan", scan_case), ("causal_conv_silu", conv_case)):
                fn = case(T)
                best = {"native": float("inf"), "torch": float("inf")}
                timed(fn, "native"), timed(fn, "torch")  # warm-up (builds the C library once)
                for _ in range(args.repeats):
                    for backend in best:
                        best[backend] = min(best[backend], timed(fn, backend))
                row = {"kernel": name, "threads": threads, "T": T, "native_ms": round(best["native"] * 1e3, 3),
                       "torch_ms": round(best["torch"] * 1e3, 3), "speedup": round(best["torch"] / best["native"], 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    cpu = cpu_model()
    result = {"benchmark": "Mamba kernels forward + backward on CPU: fused C loop vs plain PyTorch",
              "shape": {"B": B, "D": D, "N": N, "conv_width": K}, "repeats": args.repeats,
              "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                          "python": platform.python_version(), "load_average_at_end": os.getloadavg()},
              "results": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
