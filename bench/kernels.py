"""Each fused kernel against its PyTorch path (and fla / mamba-ssm where they install), forward +
backward, at training shapes of a ~350M model on a GPU.

On CUDA: CUDA-event timing (median of `--repeats` after warm-up), achieved GB/s (bytes the op must
move at least, forward + backward) and TFLOP/s, each as a fraction of the device's roofline: the
bandwidth a device-to-device copy reaches in this run and the dense bf16 peak of the GPU's data
sheet (trainer/perf.py). On CPU (no GPU, interpreter off) only the PyTorch and C paths run, at
small shapes, so the script stays a quick smoke test there.

    .venv/bin/python bench/kernels.py [--repeats 20] [--out bench/results/kernels.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from titanforge.kernels.loss import linear_cross_entropy
from titanforge.kernels.mamba import causal_conv1d_silu, chunk_selective_scan, chunk_ssd
from titanforge.kernels.moe import permute, unpermute
from titanforge.kernels.norms import rms_norm
from titanforge.kernels.titans_memory import chunk_titans_memory
from titanforge.kernels.ttt import chunk_ttt_linear, chunk_ttt_mlp
from titanforge.trainer.perf import peak_flops

from machine_info import cpu_model  # bench/machine_info.py (this folder is sys.path[0])

ROOT = Path(__file__).resolve().parents[1]


def timer(device: torch.device, repeats: int):
    """fn -> median seconds of fn() (CUDA events on a GPU, perf_counter on CPU), after warm-up."""
    def run(fn):
        for _ in range(2 if device.type == "cuda" else 1):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return run


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write): the achievable memory roofline."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = timer(device, 10)(lambda: b.copy_(a))
    return 2 * n / t


def fwd_bwd(fn, leaves, *probe_like):
    """A closure running fn() and backpropagating random probes into `leaves` (grads dropped)."""
    def run():
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        outs = [o for o in outs if o is not None and o.requires_grad]
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    return run


def cases(device: torch.device, dt: torch.dtype, small: bool):
    """(name, {path: closure}, bytes, flops) per kernel; shapes of a ~350M model (d 1024, 8 x 2048
    tokens, vocab 50304, Mamba inner 2048, N 16) on a GPU, tiny ones on CPU."""
    r = lambda *s, **kw: torch.randn(*s, device=device, dtype=kw.get("dtype", dt)).requires_grad_(  # noqa: E731
        kw.get("grad", True))
    M, C, V = (512, 128, 4096) if small else (16384, 1024, 50304)
    Bsz, T, D, N = (1, 256, 128, 16) if small else (8, 2048, 2048, 16)
    el = torch.finfo(dt).bits // 8
    paths = ["triton", "torch"] if device.type == "cuda" else ["auto", "torch"]
    out = []

    x, w, g = r(M, C), r(C, dtype=torch.float32), r(M, C)
    norm = {p: fwd_bwd(lambda p=p: rms_norm(x, w, 1e-5, g, backend=p), [x, w, g]) for p in paths}
    out.append(("rms_norm_gated", norm, 8 * M * C * el, 0))

    h, W = r(M, C), (0.02 * torch.randn(V, C, device=device, dtype=dt)).requires_grad_()
    tgt = torch.randint(0, V, (M,), device=device)
    ce = {p: fwd_bwd(lambda p=p: linear_cross_entropy(h, W, tgt, backend=p), [h, W]) for p in paths[:1]}
    ce["torch_logits"] = fwd_bwd(lambda: F.cross_entropy((h @ W.t()).float(), tgt), [h, W])
    out.append(("linear_cross_entropy", ce, (2 * M * C + 2 * V * C) * el, 6 * M * C * V))

    xc = r(Bsz, T, D)
    wc, bc = r(D, 1, 4, dtype=torch.float32), r(D, dtype=torch.float32)
    out.append(("causal_conv1d_silu", {p: fwd_bwd(lambda p=p: causal_conv1d_silu(xc, wc, bc, None, backend=p)[0],
                                                  [xc, wc, bc]) for p in paths}, 5 * Bsz * T * D * el, 0))

    u, delta, z = r(Bsz, T, D), F.softplus(r(Bsz, T, D, grad=False) - 2).requires_grad_(), r(Bsz, T, D)
    A = (-torch.rand(D, N, device=device) * 4 - 0.1).requires_grad_()
    Bm, Cm, Dv = r(Bsz, T, N), r(Bsz, T, N), r(D, dtype=torch.float32)
    leaves = [u, delta, A, Bm, Cm, Dv, z]
    scan = {p: fwd_bwd(lambda p=p: chunk_selective_scan(u, delta, A, Bm, Cm, Dv, z=z, backend=p)[0], leaves)
            for p in paths}
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        if device.type == "cuda":
            tr = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  mamba-ssm's [B, D, T] layout
            scan["mamba_ssm"] = fwd_bwd(lambda: selective_scan_fn(tr(u), tr(delta), A, tr(Bm).contiguous(),
                                                                  tr(Cm), Dv, tr(z)), leaves)
    except ImportError:
        pass
    # u, delta, z, y, and their gradients (4 of [B, T, D] each way) plus B, C: the state stays on chip.
    out.append(("selective_scan", scan, (8 * Bsz * T * D + 4 * Bsz * T * N) * el, 9 * Bsz * T * D * N * 2))

    # Mamba-2 SSD: 32 heads x 64 (inner 2048), state 128, one B/C group, chunks of 64.
    Hs, Ps, Ns = (4, 32, 32) if small else (32, 64, 128)
    xs2, dts = r(Bsz, T, Hs, Ps), F.softplus(r(Bsz, T, Hs, grad=False) - 2).requires_grad_()
    As = (-torch.rand(Hs, device=device) * 4 - 0.1).requires_grad_()
    Bs2, Cs2, Ds = r(Bsz, T, 1, Ns), r(Bsz, T, 1, Ns), r(Hs, dtype=torch.float32)
    ssd_leaves = [xs2, dts, As, Bs2, Cs2, Ds]
    ssd = {p: fwd_bwd(lambda p=p: chunk_ssd(xs2, dts, As, Bs2, Cs2, Ds, chunk_size=64, backend=p)[0], ssd_leaves)
           for p in paths}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        if device.type == "cuda":
            ssd["mamba_ssm"] = fwd_bwd(lambda: mamba_chunk_scan_combined(xs2, dts, As, Bs2, Cs2, 64, D=Ds), ssd_leaves)
    except ImportError:
        pass
    # x, dt, y and their gradients, B and C each way; the [P, N] states stay on chip.
    out.append(("ssd", ssd, (4 * Bsz * T * Hs * Ps + 4 * Bsz * T * Ns) * el,
                2 * 3 * Bsz * T * Hs * (64 * (Ns + Ps) + 2 * Ns * Ps)))

    k, E = 4, 16
    xm = r(M, C)
    ids = torch.stack([torch.randperm(E, device=device)[:k] for _ in range(M)]) if small else \
        torch.rand(M, E, device=device).topk(k, -1).indices
    order = torch.argsort(ids.reshape(-1), stable=True)
    wts = torch.rand(M, k, device=device).requires_grad_()
    ys = r(M * k, C)
    out.append(("moe_permute_unpermute",
                {p: fwd_bwd(lambda p=p: (permute(xm, order, k, backend=p), unpermute(ys, order, wts, M, backend=p)),
                            [xm, ys, wts]) for p in paths}, 4 * 2 * M * k * C * el, 0))

    # TTT-Linear / TTT-MLP dual forms at 16 heads x 64, mini-batch 16 (fla's Triton TTT-Linear where it installs;
    # its eta convention differs from ours: equal shapes and work, not bit-equal outputs).
    H, Dh, bs = 16, 64, 16
    Tt = 256 if small else 2048
    q, kk, v = r(Bsz, Tt, H, Dh), r(Bsz, Tt, H, Dh), r(Bsz, Tt, H, Dh)
    eta = (torch.rand(Bsz, Tt, H, device=device, dtype=dt) * 0.1).requires_grad_()
    lw, lb = torch.ones(H, Dh, device=device, requires_grad=True), torch.zeros(H, Dh, device=device, requires_grad=True)
    tok = 1.0 / torch.arange(1, bs + 1, device=device)
    state0 = (torch.zeros(Bsz, H, Dh, Dh, device=device), torch.zeros(Bsz, H, Dh, device=device))
    ttt = {p: fwd_bwd(lambda p=p: chunk_ttt_linear(q, kk, v, eta, tok, lw, lb, state0, backend=p)[0],
                      [q, kk, v, eta, lw, lb]) for p in paths}
    try:
        from fla.ops.ttt import chunk_ttt_linear as fla_ttt

        if device.type == "cuda":
            W0 = torch.zeros(Bsz, H, Dh, Dh, device=device)
            b0 = torch.zeros(Bsz, H, 1, Dh, device=device)
            # fla's signature: (q, k, v, ln weight, ln bias, eta [B, T, H, 1], ...), mini-batch = chunk_size.
            ttt["fla"] = fwd_bwd(lambda: fla_ttt(q, kk, v, lw, lb, eta[..., None], chunk_size=bs, initial_state=W0,
                                                 initial_state_bias=b0)[0], [q, kk, v, eta, lw, lb])
    except Exception:  # not installed, or its signature moved: the row then lacks fla
        pass
    out.append(("ttt_linear", ttt, 8 * Bsz * Tt * H * Dh * el, 3 * 4 * Bsz * Tt * H * Dh * (Dh + bs)))
    Fh = 4 * Dh
    state1 = (torch.zeros(Bsz, H, Dh, Fh, device=device), torch.zeros(Bsz, H, Fh, device=device),
              torch.zeros(Bsz, H, Fh, Dh, device=device), torch.zeros(Bsz, H, Dh, device=device))
    out.append(("ttt_mlp", {p: fwd_bwd(lambda p=p: chunk_ttt_mlp(q, kk, v, eta, tok, lw, lb, state1, backend=p)[0],
                                       [q, kk, v, eta, lw, lb]) for p in paths},
                8 * Bsz * Tt * H * Dh * el, 3 * 4 * Bsz * Tt * H * Fh * (2 * Dh + bs)))

    # Titans memory chain: 16 heads x 64, a depth-2 MLP memory of hidden width 64, chunks of 16, the
    # per-token read (dual form), momentum and forgetting per token, carried state.
    gates = [(torch.sigmoid(r(Bsz, Tt, H, grad=False)) * s).requires_grad_() for s in (0.1, 0.9, 0.1)]
    mem = [(0.1 * torch.randn(H, Dh, Dh, device=device)).requires_grad_() for _ in range(2)]
    out.append(("titans_memory",
                {p: fwd_bwd(lambda p=p: chunk_titans_memory(q, kk, v, *gates, weights=mem, chunk_size=bs,
                                                            backend=p)[0], [q, kk, v, *gates, *mem])
                 for p in paths},
                # q, k, v, o and their gradients; per token, head and layer ~10 D^2 + 4 b D forward
                # (key pass, backprop, M and S updates, the dual-form read), x3 with the backward.
                8 * Bsz * Tt * H * Dh * el, 3 * 2 * Bsz * Tt * H * (10 * Dh * Dh + 4 * bs * Dh)))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernels.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench/kernels.py times real kernels: unset TRITON_INTERPRET (the interpreter is a test tool)")
    small = device.type == "cpu"
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    run = timer(device, args.repeats if device.type == "cuda" else 3)
    bw = copy_bandwidth(device)
    peak = peak_flops(device, dtype="bfloat16") if device.type == "cuda" else 0.0
    rows = []
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/kernels.py " + " ".join(f"--{k}={v}" for k, v in vars(args).items()),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__, "python": platform.python_version(), "dtype": str(dt),
        "copy_bandwidth_GB/s": round(bw / 1e9, 1), "peak_bf16_TFLOP/s": round(peak / 1e12, 1),
        "kernels": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, paths, nbytes, flops in cases(device, dt, small):
        row = {"kernel": name, "bytes": nbytes, "flops": flops, "paths": {}}
        for path, fn in paths.items():
            try:
                t = run(fn)
            except Exception as e:  # one failing path must not hide the others' numbers
                row["paths"][path] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                continue
            entry = {"ms": round(t * 1e3, 4), "GB/s": round(nbytes / t / 1e9, 1),
                     "frac_of_copy_bw": round(nbytes / t / bw, 3)}
            if flops:
                entry["TFLOP/s"] = round(flops / t / 1e12, 2)
                if peak:
                    entry["frac_of_peak_flops"] = round(flops / t / peak, 3)
            row["paths"][path] = entry
            print(f"{name:24s} {path:13s} {t * 1e3:9.3f} ms  {nbytes / t / 1e9:8.1f} GB/s"
                  + (f"  {flops / t / 1e12:7.2f} TFLOP/s" if flops else ""), flush=True)
        rows.append(row)
        # Written after every kernel: a run cut short by the GPU check's time limit still reports.
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
