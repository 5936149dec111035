"""Training-step time of every parallel layout against one process on the same global batch.

    .venv/bin/python bench/parallel_layouts.py                       # CPU: results/parallel_layouts_cpu.json
    .venv/bin/python bench/parallel_layouts.py --device cuda         # GPU: results/parallel_layouts_cuda.json
    .venv/bin/python bench/parallel_layouts.py --families llama --layouts single,tp2

Each measurement is a real run of the trainer's step (`trainer/step.py` `build_train_step`: the
same model building, parallelize, forward/backward, gradient reduction, clipping and optimizer
step as `titanforge train`) under torchrun, on synthetic tokens (the data loader has its own
benchmark). A layout runs with as many processes as it needs; the single-process reference runs in
the same invocation, on the same global batch (the single process accumulates the micro-batches
that the layout spreads over ranks), so `speedup = single step time / layout step time`.

On the CPU the machine's cores are shared between the ranks: with 2 cores, dp=2 can at best halve
the step time of a 1-thread process and equal a 2-thread one. Both references are recorded
(`single_1thread`, `single_<cores>threads`); speedups are against the 1-thread process (what one
rank gets). On a GPU, layouts that need more GPUs than are visible are skipped (one GPU: the one-process
variants `single`, `compile`, `ac`); each result has tokens/s and MFU against the GPU's dense
bf16 peak (`trainer/perf.py`), so the figures are ready when a GPU is lent:

    .venv/bin/python bench/parallel_layouts.py --device cuda --size small --seq-len 2048 \
        --global-batch 8 --micro-batch 8 --families llama,titans-mac,titans-mag,titans-mal,titans-lmm,ttt-linear,ttt-mlp,jamba

The per-family configs are the tiny presets (configs/*-tiny.yaml) at --seq-len, or with
`--size small` a ~120M-parameter shape (d_model 768, 12 layers) for GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import cpu_model  # bench/machine_info.py (this folder is sys.path[0])

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

FAMILIES = {"llama": "llama-tiny", "titans-mac": "titans-mac-tiny", "titans-mag": "titans-mag-tiny",
            "titans-mal": "titans-mal-tiny", "titans-lmm": "titans-lmm-tiny", "ttt-linear": "ttt-linear-tiny",
            "ttt-mlp": "ttt-mlp-tiny", "jamba": "jamba-tiny"}
# name -> (processes, overrides). Families a layout does not apply to are skipped (ep: MoE only).
LAYOUTS = {
    "single": (1, []),
    # One-process variants (what fits one GPU): torch.compile, activation checkpointing.
    "compile": (1, ["train.compile=true"]),
    "ac": (1, ["train.activation_checkpointing=true"]),
    "ddp2": (2, ["parallel.dp_backend=ddp"]),
    "fsdp2": (2, ["parallel.dp_backend=fsdp"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "ep2": (2, ["parallel.ep=2"]),
    "zero1": (2, ["parallel.dp_backend=deepspeed", "parallel.zero_stage=1"]),
    "zero3": (2, ["parallel.dp_backend=deepspeed", "parallel.zero_stage=3"]),
    "dp2xtp2": (4, ["parallel.tp=2", "parallel.dp_backend=fsdp"]),
    "pp2xtp2": (4, ["parallel.pp=2", "parallel.tp=2"]),
}
SMALL = ["model.d_model=768", "model.n_layers=12", "model.n_heads=12", "model.ffn_hidden=2048",
         "model.vocab_size=50304"]


def _machine(device: str) -> dict:
    import torch

    out = {"torch": torch.__version__, "python": platform.python_version(), "cpu_cores": os.cpu_count(),
           "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    out["cpu"] = cpu_model()
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpus"] = torch.cuda.device_count()
    return out


# --------------------------------------------------------------------------- worker (under torchrun)

def worker(args) -> None:
    import torch

    from titanforge.launch.config import load_config, validate
    from titanforge.models.registry import build_model
    from titanforge.parallel import ParallelDims, build_mesh
    from titanforge.trainer.dist import init_distributed, shutdown
    from titanforge.trainer.perf import peak_flops, peak_memory_gib
    from titanforge.trainer.step import build_train_step

    world = int(os.environ.get("WORLD_SIZE", "1"))
    job = load_config(ROOT / "configs" / f"{args.preset}.yaml", args.override)
    validate(job, world)
    info = init_distributed(job.train.device, job.parallel.backend)
    dims = ParallelDims.from_config(job.parallel, info.world_size)
    mesh = build_mesh(dims, info.device.type)
    step_fn = build_train_step(job, dims, mesh, info)
    t = job.train
    accum = t.global_batch_size // (t.micro_batch_size * dims.dp)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    # The same global batch for every layout: this dp rank takes its accum micro-batches of it.
    g = torch.Generator().manual_seed(1000)
    micro = [torch.randint(0, job.model.vocab_size, (t.micro_batch_size, args.seq_len + 1), generator=g)
             for _ in range(accum * dims.dp)]
    batches = [b.to(info.device) for b in micro[dp_rank * accum:(dp_rank + 1) * accum]]

    def sync():
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step_fn.forward_backward(batches)
        step_fn.clip_grad_norm(1.0)
        step_fn.optimizer_step()
        step_fn.zero_grad()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    if info.is_main:
        tokens = t.global_batch_size * args.seq_len
        step_s = statistics.median(times)
        fpt = build_model(job.model, device="meta").flops_per_token(args.seq_len)
        peak = peak_flops(info.device, t.peak_tflops, t.dtype)
        res = {"step_s_median": step_s, "step_s_min": min(times), "tokens_per_s": tokens / step_s,
               "mfu": tokens / step_s * fpt / (peak * info.world_size), "peak_mem_gib": peak_memory_gib(info.device),
               "losses": losses, "world_size": info.world_size, "accum": accum}
        Path(args.out).write_text(json.dumps(res))
    shutdown()


# --------------------------------------------------------------------------- orchestration

def _run(preset: str, nproc: int, overrides: list[str], args, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "res.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               __file__, "--worker", "--preset", preset, "--out", str(out), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        for o in overrides:
            cmd += ["--override", o]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled", TRITON_INTERPRET="0"
                   if args.device == "cuda" else os.environ.get("TRITON_INTERPRET", "1"))
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode or not out.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()
            msg = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "")
            return {"error": msg[-400:]}
        return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--families", default="llama,titans-mac,ttt-linear,jamba")
    p.add_argument("--layouts", default=None, help="comma-separated; default: every multi-process layout on CPU, "
                   "and on GPU also compile and ac (one process)")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--fresh", action="store_true", help="overwrite the results file instead of updating its families")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    families = args.families.split(",")
    if args.layouts is None:
        args.layouts = "single,ddp2,fsdp2,tp2,pp2,ep2,zero1,zero3"
        if args.device == "cuda":
            args.layouts = "single,compile,ac," + args.layouts.split(",", 1)[1] + ",dp2xtp2,pp2xtp2"
    layouts = args.layouts.split(",")
    bad = sorted(set(families) - set(FAMILIES)) + sorted(set(layouts) - set(LAYOUTS))
    if bad:
        print(f"unknown families/layouts {bad}; families: {sorted(FAMILIES)}, layouts: {sorted(LAYOUTS)}",
              file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    gpus = 0
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            print("--device cuda but no GPU is visible", file=sys.stderr)
            return 2
    results = {"what": "median training-step time (forward, backward, gradient reduction, clip, AdamW) of each "
                       "layout on the same global batch as one process; speedup = single / layout",
               "machine": _machine(args.device), "date": time.strftime("%Y-%m-%d"),
               "settings": {k: getattr(args, k) for k in ("device", "size", "seq_len", "global_batch",
                                                          "micro_batch", "steps", "warmup")},
               "families": {}}
    for fam in families:
        base = [f"train.device={args.device}", f"train.global_batch_size={args.global_batch}",
                f"train.micro_batch_size={args.micro_batch}", f"model.max_seq_len={max(args.seq_len, 64)}"]
        if args.size == "small":
            base += SMALL
        if args.device == "cuda":
            base += ["train.dtype=bfloat16"]
        row = {}
        refs = {"single_1thread": 1} if args.device == "cpu" else {"single": 1}
        if args.device == "cpu" and cores > 1:
            refs[f"single_{cores}threads"] = cores
        for name, threads in refs.items():
            print(f"[{fam}] {name} ...", flush=True)
            row[name] = _run(FAMILIES[fam], 1, base, args, threads)
        ref = row["single_1thread" if args.device == "cpu" else "single"]
        for lay in layouts:
            if lay == "single":
                continue
            nproc, over = LAYOUTS[lay]
            if lay == "ep2" and fam != "jamba":
                continue
            if args.device == "cuda" and nproc > gpus:
                row[lay] = {"skipped": f"needs {nproc} GPUs, {gpus} visible"}
                continue
            threads = 1 if args.device == "cpu" else max(1, cores // nproc)
            print(f"[{fam}] {lay} ...", flush=True)
            r = _run(FAMILIES[fam], nproc, base + over, args, threads)
            if "step_s_median" in r and "step_s_median" in ref:
                r["speedup"] = round(ref["step_s_median"] / r["step_s_median"], 3)
                r["first_loss_vs_single"] = r["losses"][0] - ref["losses"][0]
            row[lay] = r
            print(f"    {json.dumps({k: v for k, v in r.items() if k != 'losses'})}", flush=True)
        results["families"][fam] = row
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"parallel_layouts_{args.device}.json"
    if path.exists() and not args.fresh:
        # Families measured in earlier invocations are kept (each row records its own settings).
        old = json.loads(path.read_text())
        for fam, row in results["families"].items():
            row["settings"] = results["settings"]
        kept = {f: r for f, r in old.get("families", {}).items() if f not in results["families"]}
        results["families"] = {**kept, **results["families"]}
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
