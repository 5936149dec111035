"""Soak: every preset in configs/ trains for many steps on the default data; loss curves and counts.

    .venv/bin/python bench/soak.py [--steps 1000] [--presets titans-mac-tiny ...] [--jobs 1]

Each preset runs `titanforge train` (one process, one thread) with small batches (one 64-token
sequence per step by default, as tests/trainer/test_train_families.py does for 100 steps) and the
preset's own model and optimizer. Recorded per preset: every step's loss and gradient norm,
skipped (non-finite) steps, the mean loss of the first and last 50 steps, the validation loss
at the end, wall seconds. Writes bench/results/soak.json (with the date, command and machine) and
bench/results/soak.svg (the loss curves, a 20-step moving average; drawn here, no plotting
library). A preset passes when no step was skipped or non-finite and the loss fell.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from machine_info import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def prepare_data(path: Path, seq_len: int) -> None:
    if (path / "manifest.json").exists():
        return
    subprocess.run([sys.executable, "-P", "-m", "titanforge.launch.cli", "prepare", "--out", str(path),
                    "--seq-len", str(seq_len)], check=True)


def train_command(preset: str, args, out: Path) -> list[str]:
    return [sys.executable, "-P", "-m", "titanforge.launch.cli", "train", str(ROOT / "configs" / f"{preset}.yaml"),
            f"data.path={args.data}", f"output_dir={out}", f"model.max_seq_len={args.seq_len}",
            f"train.steps={args.steps}", f"train.global_batch_size={args.batch}",
            f"train.micro_batch_size={args.batch}", f"train.val_every={args.steps}", "train.val_batches=4",
            "train.log_every=50", f"checkpoint.every={args.steps}", "checkpoint.keep_last=1",
            "wandb.mode=disabled"]


def summarise(preset: str, out: Path, wall: float | None, rc: int) -> dict:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    steps = [r for r in rows if "loss" in r]
    losses = [r["loss"] for r in steps]
    bad = [r["step"] for r in steps if r["skipped"] or not math.isfinite(r["loss"])
           or not math.isfinite(r["grad_norm"])]
    finite = [x for x in losses if math.isfinite(x)]
    n = min(50, len(finite) // 2) or 1
    first = sum(finite[:n]) / n if finite else float("nan")
    last = sum(finite[-n:]) / n if finite else float("nan")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    return {"preset": preset, "rc": rc, "steps_run": len(steps), "nonfinite_or_skipped_steps": len(bad),
            "first_bad_step": bad[0] if bad else None, "mean_first_50": round(first, 4),
            "mean_last_50": round(last, 4), "val_loss": val[-1] if val else None,
            "wall_s": None if wall is None else round(wall, 1),
            "finished": rc == 0,
            "passed": rc == 0 and not bad and len(steps) > 0 and last < first - 1.0,
            "loss": [round(x, 4) for x in losses], "grad_norm": [round(r["grad_norm"], 4) for r in steps]}


def moving_average(xs: list[float], w: int) -> list[float]:
    out, acc, q = [], 0.0, []
    for x in xs:
        q.append(x)
        acc += x
        if len(q) > w:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def svg_plot(results: list[dict], title: str, width: int = 860, height: int = 480) -> str:
    """Loss curves (20-step moving average) as a standalone SVG."""
    left, right, top, bottom = 60, 220, 40, 50
    curves = {r["preset"]: moving_average([x for x in r["loss"] if math.isfinite(x)], 20) for r in results}
    curves = {k: v for k, v in curves.items() if v}
    n = max(len(v) for v in curves.values())
    lo = math.floor(min(min(v) for v in curves.values()))
    hi = math.ceil(max(max(v) for v in curves.values()))
    sx = lambda i: left + (width - left - right) * i / max(n - 1, 1)  # noqa: E731
    sy = lambda y: top + (height - top - bottom) * (hi - y) / max(hi - lo, 1e-9)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="22" font-size="14">{title}</text>']
    for y in range(lo, hi + 1):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 8}" y="{sy(y) + 4:.1f}" text-anchor="end">{y}</text>')
    for k in range(0, 6):
        i = round((n - 1) * k / 5)
        parts.append(f'<text x="{sx(i):.1f}" y="{height - bottom + 18}" text-anchor="middle">{i + 1}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">step</text>')
    parts.append(f'<text x="16" y="{(top + height - bottom) / 2}" transform="rotate(-90 16 '
                 f'{(top + height - bottom) / 2})" text-anchor="middle">training loss (nats)</text>')
    for j, (name, ys) in enumerate(curves.items()):
        color = COLORS[j % len(COLORS)]
        pts = " ".join(f"{sx(i):.1f},{sy(y):.1f}" for i, y in enumerate(ys))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>')
        ly = top + 18 * j + 10
        parts.append(f'<line x1="{width - right + 12}" x2="{width - right + 36}" y1="{ly}" y2="{ly}" '
                     f'stroke="{color}" stroke-width="3"/>')
        parts.append(f'<text x="{width - right + 42}" y="{ly + 4}">{name} ({ys[-1]:.2f})</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> int:
    presets_all = sorted(p.name.removesuffix(".yaml") for p in (ROOT / "configs").glob("*-tiny.yaml"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--presets", nargs="+", default=presets_all, choices=presets_all)
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--jobs", type=int, default=1, help="presets trained at the same time (one thread each)")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "shakespeare-gpt2-64")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "soak")
    ap.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    ap.add_argument("--note", default="", help="how the runs were made, recorded in the results")
    ap.add_argument("--merge", type=Path, default=None,
                    help="an earlier results file: its presets not run now are kept in --out, each with the date, "
                         "command and note of its own run (e.g. families soaked in different sessions)")
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: summarise the runs already in --work (e.g. presets soaked in two batches)")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONSAFEPATH="1")
    pending, running, results = ([] if args.collect else list(args.presets)), {}, {}
    if args.collect:
        for preset in args.presets:
            log = args.work / preset / "train.log"
            done = log.exists() and "[done]" in log.read_text()
            # rc -1: the run has no [done] line (still running, or stopped): summarised as far as it got
            results[preset] = summarise(preset, args.work / preset, None, 0 if done else -1)
    else:
        prepare_data(args.data, args.seq_len)
    t_start = time.time()
    while pending or running:
        while pending and len(running) < args.jobs:
            preset = pending.pop(0)
            out = args.work / preset
            if (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").unlink()
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "train.log", "w")
            proc = subprocess.Popen(train_command(preset, args, out), cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            running[preset] = (proc, time.time(), out, log)
            print(f"[soak] started {preset}", flush=True)
        for preset, (proc, t0, out, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[preset]
            results[preset] = summarise(preset, out, time.time() - t0, proc.returncode)
            r = results[preset]
            print(f"[soak] {preset}: rc {r['rc']}, {r['steps_run']} steps, {r['nonfinite_or_skipped_steps']} "
                  f"non-finite/skipped, loss {r['mean_first_50']} -> {r['mean_last_50']}, val {r['val_loss']}, "
                  f"{r['wall_s']} s, {'PASS' if r['passed'] else 'FAIL'}", flush=True)
        time.sleep(1.0)
    ordered = [results[p] for p in args.presets]
    run_info = {"date": None, "command": " ".join([Path(sys.executable).name, "bench/soak.py", *sys.argv[1:]]),
                "note": args.note}
    for r in ordered:
        r["run"] = run_info
    if args.merge is not None:
        earlier = json.loads(args.merge.read_text())
        for r in earlier["presets"]:
            if r["preset"] not in results:
                r.setdefault("run", {"date": earlier["date"], "command": earlier["command"], "note": earlier["note"]})
                ordered.append(r)
        order = sorted(p.name.removesuffix(".yaml") for p in (ROOT / "configs").glob("*-tiny.yaml"))
        ordered.sort(key=lambda r: order.index(r["preset"]) if r["preset"] in order else len(order))
    run_info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = {"benchmark": "soak: every preset trained on the default data (Shakespeare, GPT-2 BPE)",
           "date": run_info["date"],
           "command": " ".join([Path(sys.executable).name, "bench/soak.py", *sys.argv[1:]]),
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                       "load_average_1min_at_end": round(os.getloadavg()[0], 1)},
           "settings": {"steps": args.steps, "sequences_per_step": args.batch, "seq_len": args.seq_len,
                        "threads_per_run": 1, "concurrent_runs": args.jobs,
                        "note": "each preset's model, optimizer and schedule; batch and sequence length overridden"},
           "wall_s": None if args.collect else round(time.time() - t_start, 1),
           "note": args.note,
           "train_command": " ".join(train_command("PRESET", args, args.work / "PRESET")[2:]),
           "all_passed": all(r["passed"] for r in ordered),
           "presets": ordered}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    svg = args.out.with_suffix(".svg")
    svg.write_text(svg_plot(ordered, f"soak: {args.steps} steps x {args.batch} x {args.seq_len} tokens, "
                                     f"{doc['date']} (20-step moving average)"))
    print(f"wrote {args.out} and {svg}")
    return 0 if doc["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
