"""Fault injection at a larger count: the faults of tests/faults, drawn at random, with figures.

Sequences of faults on one output directory each (testutil/faults.py), every sequence ending
with a run to the last step whose end state is compared with an uninterrupted run of the same job:

- 1 process, clean data: SIGKILL at a random moment, SIGKILL inside a save, SIGTERM, a second run
  on the same directory, a resume with a changed model, a flipped / truncated / deleted file of
  the newest checkpoint;
- 2 processes (torchrun, gloo): SIGKILL of a random rank or of the whole job, SIGTERM;
- a damaged data shard (flipped / truncated / deleted; skipped, counted) then kills, compared
  with an uninterrupted run over the same damaged data;
- a full disk during a save (a size-limited tmpfs, where `unshare -rm` allows one).

Counted: injected faults (a fault whose run ended before it could strike is not counted), bad
fault outcomes (wrong exit status, no or wrong message, a touched directory after a refused
resume), and per sequence: final weights different from the uninterrupted run, metrics.jsonl
and W&B steps missing or doubled, losses different. Target: >= 50 injected, 0 bad.

    .venv/bin/python -P bench/faults.py [--minutes 14] [--seed 0]
writes bench/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# testutil (tests/support) and machine_info (this folder; not on sys.path under python -P).
sys.path[:0] = [str(ROOT / "tests" / "support"), str(ROOT / "bench")]

from machine_info import cpu_model  # noqa: E402
from testutil import faults as F  # noqa: E402

ONE_PROC = ["kill", "kill_in_save", "sigterm", "second_run", "changed_model", "corrupt_checkpoint"]
TWO_PROC = ["kill_rank", "kill_rank", "kill", "sigterm"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=14.0, help="stop starting sequences after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults-per-sequence", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "faults.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t_start = time.time()
    deadline = t_start + 60 * args.minutes
    tmp = Path(tempfile.mkdtemp(prefix="titanforge-faults-"))
    from titanforge.data import prepare_corpus

    data = Path(prepare_corpus(tmp / "data", corpus="shakespeare", tokenizer="gpt2", seq_len=64, val_fraction=0.02,
                               seed=0)["root"])
    sequences, n = [], 0

    def record(kind: str, recs: list, verdict: dict) -> None:
        sequences.append({"kind": kind, "faults": [asdict(r) for r in recs], "end_state": verdict,
                          "end_state_good": bool(F.good(verdict))})
        inj = sum(r.injected for r in recs)
        bad = [asdict(r) for r in recs if r.injected and not r.ok]
        print(f"[faults] {kind}: {inj} injected, {len(bad)} bad outcomes, end state "
              f"{'good' if F.good(verdict) else 'BAD ' + json.dumps(verdict)[:400]} "
              f"({time.time() - t_start:.0f}s)", flush=True)
        for b in bad:
            print(f"    BAD {b['kind']}: {b['detail'][:400]}", flush=True)

    ref1 = F.reference(tmp / "ref1", data)
    print(f"[faults] reference (1 process): {ref1.seconds:.1f}s", flush=True)

    # ENOSPC once, early (a size-limited tmpfs holding about one and a half checkpoints).
    if F.can_limit_size():
        n += 1
        ckpts = ref1.out / "checkpoints"
        ckpt_mb = sum(f.stat().st_size for f in ckpts.rglob("*") if f.is_file()) / len(list(ckpts.iterdir())) / 2**20
        rec, verdict = F.enospc_run(tmp / f"s{n}", data, ref1, size_mb=int(ckpt_mb * 1.5) + 1)
        record("enospc", [rec], verdict)

    # Damaged shards: a reference over the damaged data, then kills.
    for how in ("flip", "truncate", "delete"):
        if time.time() > deadline:
            break
        n += 1
        bad_data = tmp / f"data-{how}"
        name = F.shard_data(data, bad_data, rng, how)
        ref_bad = F.reference(tmp / f"ref-{how}", bad_data)
        sc = F.Scenario(tmp / f"s{n}", bad_data)
        recs, verdict = F.run_sequence(sc, ref_bad, ["kill", "kill_in_save"], rng)
        rows = [r for r in F.lu.metrics(sc.out) if "loss" in r]
        counted = bool(rows) and all(r.get("corrupt_shards", 0) >= 1 for r in rows)
        named = any(name in p.read_text(errors="replace") for p in sc.root.glob("*.log"))
        recs.insert(0, F.Record(f"shard_{how}", True, counted and named,
                                f"{name}: counted in metrics {counted}, named in the log {named}"))
        record(f"shard_{how}", recs, verdict)

    ref2 = None
    while time.time() < deadline:
        n += 1
        if n % 4 == 0:
            if ref2 is None:
                ref2 = F.reference(tmp / "ref2", data, nproc=2)
                print(f"[faults] reference (2 processes): {ref2.seconds:.1f}s", flush=True)
            kinds = [rng.choice(TWO_PROC) for _ in range(3)]
            recs, verdict = F.run_sequence(F.Scenario(tmp / f"s{n}", data, nproc=2), ref2, kinds, rng)
            record("two_process", recs, verdict)
        else:
            kinds = [rng.choice(ONE_PROC) for _ in range(args.faults_per_sequence)]
            recs, verdict = F.run_sequence(F.Scenario(tmp / f"s{n}", data), ref1, kinds, rng)
            record("one_process", recs, verdict)

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
    }
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["bench/faults.py", *sys.argv[1:]]),
        "machine": {"cpu": cpu_model(), "python": platform.python_version(), "note": "shared host, 2 cores"},
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
