"""`titanforge eval CHECKPOINT [CHECKPOINT ...] --suite NAME [--lengths ...]`: long-context suites on saved
checkpoints, in one process or on every rank under torchrun (the same numbers either way).

Each checkpoint's own config.yaml gives the model and the data (tokenizer, and the val split as
the haystack of the natural-text suites). Per checkpoint and suite, rank 0 prints the table and
writes eval_<suite>.json and eval_<suite>.png (the length x depth heat map) beside it; --out
collects every result in one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="titanforge eval", description="Long-context suites on saved checkpoints.")
    p.add_argument("checkpoints", nargs="+", help="step_N directories, or run directories (newest checkpoint)")
    p.add_argument("--suite", action="append", required=True,
                   help="task spec, repeatable: passkey | niah_number | niah_word | mqar[:pairs=N,...] | babilong")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default: training length)")
    p.add_argument("--depths", type=int, default=5, help="needle depths per length, 0 to 1")
    p.add_argument("--samples", type=int, default=8, help="samples per (length, depth) cell")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data", default=None, help="prepared data to take the tokenizer and haystack from "
                                                "(default: the checkpoint's data.path)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--out", default=None, help="write every result to this JSON file")
    p.add_argument("--nproc", type=int, default=1, help="processes (each takes a share of the samples)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    from titanforge.data.tasks import TaskError, parse_spec
    from titanforge.launch.config import ConfigError, load_config

    rank = int(os.environ.get("RANK", "0"))

    def fail(msg: str) -> int:
        if rank == 0:
            print(f"titanforge eval: {msg}", file=sys.stderr)
        return 2

    try:
        for s in args.suite:
            parse_spec(s)
    except TaskError as e:
        return fail(str(e))
    if min(args.depths, args.samples, args.batch_size) < 1 or (args.lengths and min(args.lengths) < 2):
        return fail("--depths, --samples and --batch-size must be >= 1 and --lengths >= 2")
    from titanforge.trainer.evaluate import resolve_checkpoint

    jobs = []
    try:
        for c in args.checkpoints:
            ckpt = resolve_checkpoint(c)
            overrides = [f"data.path={args.data}"] if args.data else []
            job = load_config(ckpt / "config.yaml", overrides)
            jobs.append((ckpt, job))
    except (FileNotFoundError, ConfigError) as e:
        return fail(str(e))
    if args.nproc > 1 and "RANK" not in os.environ:
        os.environ["PYTHONSAFEPATH"] = "1"
        # The ranks get the arguments without --nproc (torchrun would take it for --nproc-per-node).
        rest, given = [], list(argv if argv is not None else sys.argv[1:])
        while given:
            a = given.pop(0)
            if a == "--nproc":
                given.pop(0)
            elif not a.startswith("--nproc="):
                rest.append(a)
        cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", "-m", "titanforge.launch.eval", *rest]
        sys.stdout.flush()
        os.execv(sys.executable, cmd)

    from titanforge.data import read_manifest
    from titanforge.trainer.dist import init_distributed, shutdown
    from titanforge.trainer.evaluate import evaluate_checkpoint

    info = init_distributed(args.device)
    everything = {}
    try:
        for ckpt, job in jobs:
            lengths = args.lengths or [read_manifest(job.data.path)["seq_len"]]
            # Rotary tables are derived from max_seq_len, never saved: longer evaluations may raise it.
            job.model.max_seq_len = max(job.model.max_seq_len, max(lengths))
            results = evaluate_checkpoint(job, ckpt, args.suite, lengths=lengths, depths=args.depths,
                                          samples=args.samples, batch_size=args.batch_size, seed=args.seed,
                                          info=info)
            if info.is_main:
                print(f"[eval] {ckpt} ({job.model.family}) on {info.world_size} process(es)")
                for r in results.values():
                    print(r.table(), flush=True)
                    r.write(ckpt)
            everything[str(ckpt)] = {name: r.to_dict() for name, r in results.items()}
    finally:
        shutdown()
    if info.is_main and args.out:
        Path(args.out).write_text(json.dumps(everything, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
