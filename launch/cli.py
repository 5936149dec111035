"""The `titanforge` command.

    titanforge prepare [--out DIR --corpus ... --tokenizer ...]   tokenize a corpus into shards
    titanforge train CONFIG [key=value ...] [--nproc N] [multi-node flags]
    titanforge eval CHECKPOINT [...] --suite NAME [--lengths ...] [--nproc N]
                                                                  long-context suites on checkpoints (launch/eval.py)
    titanforge slurm CONFIG --nodes N --gpus-per-node G [--partition P --time HH:MM:SS ...] [key=value ...]
                                                                  write an sbatch script (launch/slurm.py)
    titanforge export CHECKPOINT --out DIR                        checkpoint -> safetensors (HF for Llama/Jamba)
    titanforge plan CONFIG --gpus N --gpu-mem GB [--nodes M]      memory per rank and step time per layout
    titanforge compare RUN_DIR [RUN_DIR ...]                      validation losses of runs side by side
    titanforge svf export CHECKPOINT --out FILE                   an SVF run's z-vectors (Transformer² expert)

`train` with --nproc 1 on one node runs in this process; otherwise it validates the config for
the whole world first (so a bad layout fails before anything starts), checks the job against
the machine (launch/preflight.py: data, output_dir, run lock, checkpoints, free space; exit 2 with
one line) and then runs torchrun (`python -m torch.distributed.run`), which starts
`titanforge.launch.train` per rank, passing preemption signals to the ranks (`_supervise`).
"""

from __future__ import annotations

import argparse
import os
import sys


def _train(argv: list[str], console: bool = False) -> int:
    p = argparse.ArgumentParser(prog="titanforge train", description="Train from a YAML preset and overrides.")
    p.add_argument("config", help="YAML preset, e.g. configs/llama-tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.add_argument("--nproc", type=int, default=1, help="processes per node (GPUs per node on GPU machines)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--rdzv-endpoint", default=None, help="host:port of the head node (multi-node)")
    p.add_argument("--rdzv-id", default="titanforge")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failure")
    # Intermixed: flags and key=value overrides may come in any order.
    args = p.parse_intermixed_args(argv)
    if args.nproc == 1 and args.nnodes == 1 and args.max_restarts == 0:
        from titanforge.launch.train import main as train_main

        if console:
            # This process is the rank: a preemption signal during start-up is kept, not fatal.
            from titanforge.trainer.signals import catch_early

            catch_early()

        return train_main([args.config, *args.overrides])

    from titanforge.launch.config import ConfigError, load_config, validate
    from titanforge.launch.preflight import PREFLIGHT_ENV, preflight

    world = args.nproc * args.nnodes
    try:
        job = load_config(args.config, args.overrides)
        validate(job, world_size=world)
        # Machine checks (data, output_dir, lock, checkpoints, free space) once, on the head node.
        if args.node_rank == 0:
            preflight(job)
    except ConfigError as e:
        print(f"titanforge: {e}", file=sys.stderr)
        return 2
    # -P and PYTHONSAFEPATH (inherited by torchrun's ranks, which it starts as `python -m`): the
    # current directory never goes on sys.path, so our folders cannot shadow installed packages.
    env = dict(os.environ, PYTHONSAFEPATH="1", **{PREFLIGHT_ENV: "1"})
    # torchrun leaves SIGTERM / SIGUSR1 to the ranks (see _supervise).
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           f"--max-restarts={args.max_restarts}", "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT"]
    if args.nnodes == 1:
        cmd.append("--standalone")
    else:
        if not args.rdzv_endpoint:
            print("titanforge: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (the head node)", file=sys.stderr)
            return 2
        cmd += [f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id}"]
    cmd += ["-m", "titanforge.launch.train", args.config, *args.overrides]
    print("+ " + " ".join(cmd), flush=True)
    return _supervise(cmd, env)


def _supervise(cmd: list[str], env: dict) -> int:
    """Run torchrun and hand preemption signals to the ranks ourselves.

    torchrun answers SIGTERM by killing the ranks and exiting 1 with a traceback, even when they
    would save and stop cleanly, and even while it tears down a finished run. So torchrun starts
    with SIGTERM and SIGUSR1 ignored (and not in its --signals-to-handle); the ranks set
    their own handlers (trainer/signals.py). A signal sent to the whole process group (SLURM,
    `kill -- -PGID`) reaches the ranks directly; one sent to this process is forwarded to them.
    Our exit status is torchrun's: 0 after a preemption that saved.
    """
    import signal
    import subprocess

    import psutil

    preempt = (signal.SIGTERM, signal.SIGUSR1)
    # torchrun's Popen; the preemption signal once one came (told again every second: a rank
    # that does not listen yet, still starting, would miss it).
    state: dict = {"proc": None, "signal": None}

    def ignore_preemption():
        for sig in preempt:
            signal.signal(sig, signal.SIG_IGN)

    def forward(signum, frame):
        state["signal"] = signum
        try:
            children = psutil.Process(state["proc"].pid).children(recursive=True) if state["proc"] else []
        except psutil.Error:
            return
        for p in children:
            try:
                cmd = " ".join(p.cmdline())
                # The ranks, not torchrun (whose command line names the module too).
                if "titanforge.launch.train" in cmd and "torch.distributed.run" not in cmd:
                    p.send_signal(signal.SIGUSR1)
            except psutil.Error:
                pass

    # (Before torchrun starts: a signal in between must not end this process and orphan it.)
    previous = {sig: signal.signal(sig, forward) for sig in preempt}
    try:
        proc = subprocess.Popen(cmd, env=env, preexec_fn=ignore_preemption)
        state["proc"] = proc
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if state["signal"] is not None:
                    forward(state["signal"], None)
            except KeyboardInterrupt:
                continue  # torchrun got the SIGINT too: it stops the ranks; wait for it
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _prepare(argv: list[str]) -> int:
    from titanforge.data.cli import prepare_main

    return prepare_main(argv)


def _slurm(argv: list[str]) -> int:
    from titanforge.launch.slurm import main as slurm_main

    return slurm_main(argv)


def _export(argv: list[str]) -> int:
    from titanforge.launch.export import main as export_main

    return export_main(argv)


def _plan(argv: list[str]) -> int:
    from titanforge.launch.plan import main as plan_main

    return plan_main(argv)


def _compare(argv: list[str]) -> int:
    from titanforge.launch.compare import main as compare_main

    return compare_main(argv)


def _svf(argv: list[str]) -> int:
    from titanforge.launch.svf import main as svf_main

    return svf_main(argv)


def _eval(argv: list[str]) -> int:
    from titanforge.launch.eval import main as eval_main

    return eval_main(argv)


COMMANDS = {"train": _train, "prepare": _prepare, "slurm": _slurm, "export": _export, "plan": _plan,
            "compare": _compare, "eval": _eval, "svf": _svf}


def _ignore_preemption() -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _reexec_with_huge_pages() -> None:
    """Run the `titanforge` command again, once, with glibc's huge-page tunable in its environment
    (glibc reads it only at process start; torchrun and its ranks inherit it). Only from the
    console script on Linux: a caller of main(argv) keeps its process."""
    from titanforge.trainer.cpu_env import huge_pages_env  # torch-free: this runs before the re-exec

    env = huge_pages_env(dict(os.environ))
    if sys.platform != "linux" or env == dict(os.environ) or os.environ.get("_TITANFORGE_REEXEC"):
        return
    env["_TITANFORGE_REEXEC"] = "1"
    sys.stdout.flush()
    env["PYTHONSAFEPATH"] = "1"
    os.execve(sys.executable, [sys.executable, "-P", "-m", "titanforge.launch.cli", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        # A W&B service address inherited from the shell belongs to another process, whose service
        # may still hold a resumed run's id ("run ID is in use"); our runs start their own.
        os.environ.pop("WANDB_SERVICE", None)
    if argv is None and sys.argv[1:2] == ["train"]:
        # Preemption signals are the run's to handle (trainer/signals.py, _supervise): until it
        # listens, and once it has returned (a signal during interpreter teardown, where Python
        # puts the default action back, would turn a finished run's exit status into -15), they
        # are ignored. The setting survives the re-exec below.
        _ignore_preemption()
        _reexec_with_huge_pages()
    console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "train":
        code = _train(argv[1:], console=console)
        if console:
            _ignore_preemption()
        return code
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
