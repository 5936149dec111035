"""Do the memories remember? Five models, the same parameter count and training tokens, trained on
a recall mixture and evaluated at 1x, 2x, 4x and 8x the attention window.

    .venv/bin/python -P bench/long_context.py --steps 1600 --batch 8 --lr 1e-2 --fraction 1.0 \
        --samples 6 --parallel                                # the committed run (see README)
    .venv/bin/python -P bench/long_context.py --steps 20      # a quick look

Models (presets of configs/, resized): Titans MAC (attention inside segments of W tokens, the
neural memory across them), Titans LMM (the memory alone), TTT-Linear, Jamba (Mamba layers with
one full-attention layer), and a Llama with sliding-window attention of W tokens (the
window-only baseline). Each family's d_model is chosen so that its parameter count is closest
to the Llama's. Data: the default corpus (Shakespeare) tokenized with a byte-level BPE of 512
tokens trained on it (a small vocabulary keeps the LM head from dominating CPU time), rows of
4W + 1 tokens; a fraction of the rows replaced by task samples (passkey, MQAR) with the loss on
their answer tokens (data/tasks). Every model trains the same steps x batch x length tokens on
one process; then one `titanforge eval` launch scores every checkpoint at lengths W..8W.

Writes bench/results/long_context.json (date, command, machine, per model: parameters, steps,
tokens, seconds, final loss, accuracy by suite and length, chance) and
bench/results/long_context.png (rows: the models in the order above; columns: suite x length).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from machine_info import cpu_model  # noqa: E402

MODELS = {  # name -> (preset, overrides that do not depend on the size)
    "titans-mac": ("titans-mac-tiny", {"model.n_layers": 2}),
    "titans-lmm": ("titans-lmm-tiny", {"model.n_layers": 2}),
    "ttt-linear": ("ttt-linear-tiny", {"model.n_layers": 2}),
    # Two layers like the others: a Mamba layer and an attention layer with a 4-expert MoE (top 2).
    "jamba": ("jamba-tiny", {"model.n_layers": 2, "model.jamba.layer_pattern": "MD AE", "model.ffn_hidden": 0,
                             "model.jamba.moe.n_experts": 4, "model.jamba.moe.top_k": 2}),
    "llama-window": ("llama-tiny", {"model.n_layers": 2}),
}
SUITES = ["passkey:digits=2", "mqar:pairs=4,keys=16,values=16,noise=16"]


def sh(cmd: list[str], log: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed (rc {rc}); see {log}")
    return time.perf_counter() - t0


def sized(name: str, window: int, vocab: int, target: int | None) -> tuple[dict, int]:
    """The overrides of `name` with the d_model whose parameter count is closest to `target`."""
    from titanforge.launch.config import load_config
    from titanforge.models.registry import build_model

    preset, extra = MODELS[name]
    base = {**extra, "model.vocab_size": vocab, "model.max_seq_len": 8 * window}
    if name.startswith("titans"):
        base.update({"model.titans.segment_len": window, "model.titans.window": window})
    if name == "llama-window":
        base.update({"model.attention_window": window, "model.n_kv_heads": 2})
    best = None
    for d in (32, 40, 48, 56, 64, 72, 80, 96, 112, 128):
        over = {**base, "model.d_model": d}
        try:
            job = load_config(ROOT / "configs" / f"{preset}.yaml", [f"{k}={v}" for k, v in over.items()] + ["data.path=x"])
        except Exception:  # a width the family's heads or kernels cannot split
            continue
        n = sum(p.numel() for p in build_model(job.model, device="meta").parameters())
        if target is None and d == 64:
            return over, n
        if target is not None and (best is None or abs(n - target) < abs(best[1] - target)):
            best = (over, n)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--window", type=int, default=32, help="attention window W (Llama) = Titans segment")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--fraction", type=float, default=0.75, help="share of training rows that are task samples")
    p.add_argument("--samples", type=int, default=4, help="eval samples per (length, depth) cell")
    p.add_argument("--depths", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--parallel", action="store_true", help="train all models at once, one thread each")
    p.add_argument("--work", default="runs/long_context")
    p.add_argument("--out", default="bench/results/long_context.json")
    args = p.parse_args()
    W, work = args.window, ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-P", "-m", "titanforge.launch.cli"]
    data = work / "data"
    if not (data / "manifest.json").exists():
        sh([*py, "prepare", "--out", str(data), "--tokenizer", "bpe:512", "--seq-len", str(4 * W),
            "--val-fraction", "0.05"], work / "prepare.log", args.threads)
    vocab = 64 * -(-json.loads((data / "manifest.json").read_text())["vocab_size"] // 64)

    _, target = sized("llama-window", W, vocab, None)
    runs, jobs = {}, []
    for name in args.models:
        over, n = sized(name, W, vocab, target)
        out = work / name
        over.update({"data.path": data, "output_dir": out, "train.steps": args.steps,
                     "train.global_batch_size": args.batch, "train.micro_batch_size": args.batch,
                     "train.val_every": 0, "train.log_every": 10, "checkpoint.every": args.steps,
                     "checkpoint.keep_last": 1, "checkpoint.resume": "never", "wandb.mode": "disabled",
                     "optim.lr": args.lr, "optim.warmup_steps": 10, "data.tasks.fraction": args.fraction,
                     # Quoted: a spec's own commas would otherwise split the list.
                     "data.tasks.names": "[" + ",".join(f"'{s}'" for s in SUITES) + "]"})
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)])
        preset = MODELS[name][0]
        print(f"[{name}] {n:,} parameters, d_model {over['model.d_model']}: training {args.steps} steps", flush=True)
        cmd = [*py, "train", str(ROOT / "configs" / f"{preset}.yaml"), *[f"{k}={v}" for k, v in over.items()]]
        runs[name] = {"preset": preset, "d_model": over["model.d_model"], "parameters": n}
        jobs.append((name, cmd, out))
    # The host's load (1-minute average) before and after training: on a shared machine the
    # seconds below depend on it.
    load_before = os.getloadavg()[0]
    t_train = time.perf_counter()
    if args.parallel:
        # All trainings at once, one thread each (a shared machine: each gets its share of the cores).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(jobs)) as pool:
            secs = list(pool.map(lambda j: sh(j[1], work / f"{j[0]}.log", 1), jobs))
    else:
        secs = [sh(cmd, work / f"{name}.log", args.threads) for name, cmd, _ in jobs]
    train_wall, load_after = time.perf_counter() - t_train, os.getloadavg()[0]
    for (name, _, out), sec in zip(jobs, secs):
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if r.get("loss") is not None]
        runs[name].update({"steps": len(losses), "tokens": len(losses) * args.batch * 4 * W,
                           "train_seconds": round(sec, 1), "first_loss": losses[0] if losses else None,
                           "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                           "skipped_steps": sum(1 for r in rows if r.get("skipped"))})
        print(f"[{name}] {sec:.0f} s, loss {runs[name]['first_loss']:.3f} -> {runs[name]['final_loss']:.3f}",
              flush=True)

    lengths = [W, 2 * W, 4 * W, 8 * W]
    ckpts = [str(work / n / "checkpoints") for n in runs]
    t0 = time.perf_counter()
    eval_json = work / "eval.json"
    sh([*py, "eval", *ckpts, *sum((["--suite", s] for s in SUITES), []), "--lengths", *map(str, lengths),
        "--depths", str(args.depths), "--samples", str(args.samples), "--out", str(eval_json)],
       work / "eval.log", args.threads)
    eval_secs = time.perf_counter() - t0
    results = json.loads(eval_json.read_text())
    for (name, run), (ckpt, suites) in zip(runs.items(), results.items()):
        run["checkpoint"] = os.path.relpath(ckpt, ROOT)
        run["eval"] = {s: {"by_length": r["by_length"], "accuracy": r["accuracy"], "logprob": r["logprob"],
                           "chance": r["chance"]} for s, r in suites.items()}

    record = {"benchmark": "long_context", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "command": " ".join(["python -P bench/long_context.py", *sys.argv[1:]]),
              "machine": {"cpu": cpu_model(), "threads": 1 if args.parallel else args.threads,
                          "cores_visible": os.cpu_count(), "trainings_concurrent": bool(args.parallel),
                          "load_1min_before_training": round(load_before, 2),
                          "load_1min_after_training": round(load_after, 2)},
              "train_wall_seconds": round(train_wall, 1),
              "window": W, "train_length": 4 * W, "eval_lengths": lengths, "suites": SUITES,
              "mixture": {"tasks": SUITES, "fraction": args.fraction, "loss": "answer tokens of task rows"},
              "steps": args.steps, "batch": args.batch, "lr": args.lr, "eval_samples_per_cell": args.samples,
              "eval_depths": args.depths, "eval_seconds": round(eval_secs, 1), "models": runs}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out.with_suffix(".png"))
    print(table(record))
    return 0


def table(record: dict) -> str:
    lengths = record["eval_lengths"]
    head = "| model | params | steps | train s | loss | " + " | ".join(
        f"{s.split(':')[0]} {L}" for s in record["suites"] for L in lengths) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in record["models"].items():
        cells = ["-" if r["eval"][s]["by_length"][str(L)] is None else f"{100 * r['eval'][s]['by_length'][str(L)]:.0f}%"
                 for s in record["suites"] for L in lengths]
        lines.append(f"| {name} | {r['parameters']:,} | {r['steps']} | {r['train_seconds']:.0f} | "
                     f"{r['final_loss']:.2f} | " + " | ".join(cells) + " |")
    chance = ", ".join(f"{s}: {100 * next(iter(record['models'].values()))['eval'][s]['chance']:.1f}%"
                       for s in record["suites"])
    return "\n".join(lines) + f"\n\nchance: {chance}"


def plot(record: dict, path: Path) -> None:
    """Rows: models in order; columns: each suite's lengths (labelled by length)."""
    import numpy as np

    from titanforge.trainer.heatmap import write_heatmap

    lengths = record["eval_lengths"]
    grid = np.array([[np.nan if r["eval"][s]["by_length"][str(L)] is None else r["eval"][s]["by_length"][str(L)]
                      for s in record["suites"] for L in lengths]
                     for r in record["models"].values()])
    write_heatmap(path, grid, [str(i + 1) for i in range(len(grid))],
                  [str(L) for _ in record["suites"] for L in lengths])


if __name__ == "__main__":
    sys.exit(main())
