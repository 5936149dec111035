"""`titanforge slurm`: write an sbatch script that trains on N nodes and survives preemption.

    titanforge slurm CONFIG --nodes N --gpus-per-node G [--partition P --time HH:MM:SS --account A
                     --job-name J --output-dir D --port P --out FILE] [key=value ...]

The script is submitted unchanged (`sbatch FILE [key=value ...]`: arguments to the script are
appended to the overrides). One task per node (`srun`), each running `torchrun` with
`--nproc-per-node=G` and a c10d rendezvous on the first node of the allocation. `output_dir` is
fixed to an absolute path in the script, so a requeued job finds its checkpoints and resumes.

Preemption, as measured with torch 2.13 (torch/distributed/elastic/multiprocessing/api.py):
torchrun turns the signals in `--signals-to-handle` (default SIGTERM, SIGINT, SIGHUP, SIGQUIT)
into a shutdown that forwards the same signal to every worker and SIGKILLs them after
`--shutdown-timeout` seconds (default 30); any other signal, SIGUSR1 included, kills torchrun
itself with the default action and leaves the workers untold. So:
- `#SBATCH --signal=B:USR1@LEAD` sends SIGUSR1 to the batch shell only, LEAD seconds before the
  time limit; the script traps it and passes SIGUSR1 to `srun`, which forwards it to its tasks
  (one torchrun per node);
- torchrun runs with `--signals-to-handle=...,SIGUSR1` and `--shutdown-timeout=LEAD-20`, so it
  forwards SIGUSR1 to the workers and gives them time to finish the step and save;
- the workers' PreemptionWatcher (trainer/signals.py) agrees on the stop, saves a checkpoint and
  exits 0; the script then runs `scontrol requeue $SLURM_JOB_ID` (`--requeue`,
  `--open-mode=append`: the same job id, one log), and the requeued job resumes.

Without a GPU (tests, CPU clusters) `--nproc-per-node P` replaces `--gpus-per-node` and no GPUs
are requested; the trainer then uses gloo.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from titanforge.launch.config import ConfigError, load_config, validate
from titanforge.trainer.cpu_env import HUGE_PAGES_TUNABLE

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_PARTITION = re.compile(r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})$")
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


class SlurmError(ValueError):
    """Bad arguments for the sbatch script; the message names the flag and the fix."""


def _seconds(time: str) -> int:
    m = _TIME.match(time)
    if not m:
        raise SlurmError(f"--time {time!r} must be HH:MM:SS or D-HH:MM:SS (e.g. --time 24:00:00 or "
                         f"--time 2-00:00:00)")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    if minutes > 59 or seconds > 59:
        raise SlurmError(f"--time {time!r}: minutes and seconds must be < 60")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="titanforge slurm", description="Write an sbatch script for a training run.")
    p.add_argument("config", help="YAML preset, e.g. configs/llama-tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=1000")
    p.add_argument("--nodes", type=int, required=True)
    per_node = p.add_mutually_exclusive_group(required=True)
    per_node.add_argument("--gpus-per-node", type=int, help="GPUs per node: one training process each")
    per_node.add_argument("--nproc-per-node", type=int, help="processes per node without GPUs (CPU, gloo)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node (default 8 per process)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default="24:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--account", default=None)
    p.add_argument("--job-name", default="titanforge")
    p.add_argument("--output-dir", default=None, help="training output_dir (default: the config's), made absolute")
    p.add_argument("--port", type=int, default=None,
                   help="rendezvous port on the head node (default 20000 + job id mod 20000)")
    p.add_argument("--signal-lead", type=int, default=120,
                   help="seconds before the time limit at which SLURM asks the run to checkpoint and stop")
    p.add_argument("--python", default=sys.executable, help="the venv's python on the compute nodes")
    p.add_argument("--out", default=None, help="write the script here instead of stdout")
    return p


def check(args: argparse.Namespace):
    """The job config, after every problem of the arguments and the layout is raised (SlurmError)."""
    nproc = args.gpus_per_node if args.gpus_per_node is not None else args.nproc_per_node
    flag = "--gpus-per-node" if args.gpus_per_node is not None else "--nproc-per-node"
    if args.nodes < 1:
        raise SlurmError(f"--nodes {args.nodes} must be >= 1")
    if nproc < 1:
        raise SlurmError(f"{flag} {nproc} must be >= 1")
    if args.partition is not None and not _PARTITION.match(args.partition):
        raise SlurmError(f"--partition {args.partition!r} is not a SLURM partition name (letters, digits, "
                         f"'_', '.', '-'; several separated by commas, e.g. --partition gpu,gpu-long)")
    for name in ("account", "job_name"):
        value = getattr(args, name)
        if value is not None and not _NAME.match(value):
            raise SlurmError(f"--{name.replace('_', '-')} {value!r} may hold only letters, digits and '_.+-'")
    if args.signal_lead < 30:
        raise SlurmError(f"--signal-lead {args.signal_lead} must be >= 30 s (time to finish a step and save)")
    if _seconds(args.time) <= 2 * args.signal_lead:
        raise SlurmError(f"--time {args.time} must be longer than twice --signal-lead ({args.signal_lead} s): the "
                         f"preemption signal comes {args.signal_lead} s before the limit")
    if args.port is not None and not 1024 <= args.port <= 65535:
        raise SlurmError(f"--port {args.port} must be in 1024..65535")
    if not Path(args.config).exists():
        raise SlurmError(f"config file {args.config} does not exist; presets live in configs/")
    try:
        job = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SlurmError(str(e)) from None
    tp = job.parallel.tp
    if nproc % tp:
        raise SlurmError(f"parallel.tp={tp} does not divide {flag} {nproc}: a tensor-parallel group stays inside "
                         f"one node; use {flag} as a multiple of {tp} or lower parallel.tp")
    try:
        validate(job, world_size=args.nodes * nproc)
    except ConfigError as e:
        raise SlurmError(f"{args.nodes} nodes x {nproc} processes = {args.nodes * nproc} ranks: {e}") from None
    return job


def render(args: argparse.Namespace, job) -> str:
    nproc = args.gpus_per_node if args.gpus_per_node is not None else args.nproc_per_node
    out_dir = Path(args.output_dir or job.output_dir).expanduser().resolve()
    config = Path(args.config).resolve()
    overrides = [o for o in args.overrides if not o.startswith("output_dir=")] + [f"output_dir={out_dir}"]
    cpus = args.cpus_per_task or 8 * nproc
    sbatch = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1"]
    if args.gpus_per_node is not None:
        sbatch.append(f"--gpus-per-node={args.gpus_per_node}")
    sbatch += [f"--cpus-per-task={cpus}", f"--time={args.time}"]
    if args.partition:
        sbatch.append(f"--partition={args.partition}")
    if args.account:
        sbatch.append(f"--account={args.account}")
    sbatch += [f"--signal=B:USR1@{args.signal_lead}", "--requeue", "--open-mode=append",
               f"--output={out_dir}/slurm-%j.out"]
    port = str(args.port) if args.port else "$((20000 + SLURM_JOB_ID % 20000))"
    q = shlex.quote
    torchrun = [
        '"$PYTHON"', "-P", "-m", "torch.distributed.run", '--nnodes="$SLURM_NNODES"', f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", '--rdzv-endpoint="$HEAD:$PORT"', '--rdzv-id="$SLURM_JOB_ID"',
        f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={args.signal_lead - 20}",
        "-m", "titanforge.launch.train", '"$CONFIG"', '"${OVERRIDES[@]}"',
    ]
    lines = ["#!/bin/bash", *(f"#SBATCH {s}" for s in sbatch),
             "# Written by `titanforge slurm` (launch/slurm.py). Submit: sbatch THIS_FILE [key=value ...]",
             "set -uo pipefail",
             "",
             f"PYTHON={q(str(Path(args.python).absolute()))}",
             f"CONFIG={q(str(config))}",
             f"OVERRIDES=({' '.join(q(o) for o in overrides)})",
             "# Arguments to the script (sbatch FILE a=b ...) are further overrides.",
             'OVERRIDES+=("$@")',
             'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
             f"PORT={port}",
             f"mkdir -p {q(str(out_dir))}",
             "# The job's directory never goes on the ranks' sys.path (torchrun starts them with -m).",
             "export PYTHONSAFEPATH=1",
             "# Machine checks (data, output_dir, run lock, checkpoints, free space) before any rank starts:",
             "# a problem is one line in the job's output and exit status 2 (launch/preflight.py).",
             'if [ -z "${TITANFORGE_PREFLIGHT_DONE:-}" ]; then',
             f'    "$PYTHON" -P -m titanforge.launch.preflight --world "$((SLURM_NNODES * {nproc}))" "$CONFIG" '
             '"${OVERRIDES[@]}" || exit 2',
             "fi",
             "export TITANFORGE_PREFLIGHT_DONE=1",
             'echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES nodes, '
             'head $HEAD:$PORT"',
             "",
             "# glibc's huge-page malloc for the ranks, as `titanforge train` sets it (trainer/cpu_env.py):",
             "# glibc reads it at process start. TITANFORGE_HUGE_PAGES=0, or your own glibc.malloc.hugetlb, wins.",
             'if [ "${TITANFORGE_HUGE_PAGES:-1}" != 0 ] && [[ "${GLIBC_TUNABLES:-}" != *glibc.malloc.hugetlb* ]]; then',
             f'    export GLIBC_TUNABLES="${{GLIBC_TUNABLES:+$GLIBC_TUNABLES:}}{HUGE_PAGES_TUNABLE}"',
             "fi",
             "",
             "# SLURM's --signal=B:USR1 reaches only this shell: pass it to srun, which forwards it to its",
             "# tasks (torchrun), which forwards it to the workers; they checkpoint and exit (launch/slurm.py).",
             "preempted=0",
             'srun_pid=""',
             "trap 'preempted=1; echo \"[slurm] USR1: checkpoint and stop\"; "
             '[ -n "$srun_pid" ] && kill -USR1 "$srun_pid"\' USR1',
             "",
             "srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
             "    " + " ".join(torchrun) + " &",
             "srun_pid=$!",
             "# A trapped signal interrupts `wait`; wait again until srun has really exited.",
             'wait "$srun_pid"; status=$?',
             'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; status=$?; done',
             'if [ "$preempted" = 1 ]; then',
             '    echo "[slurm] preempted: requeueing job $SLURM_JOB_ID; it resumes from the last checkpoint"',
             '    scontrol requeue "$SLURM_JOB_ID"',
             "    exit 0",
             "fi",
             'exit "$status"',
             ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    try:
        job = check(args)
    except SlurmError as e:
        print(f"titanforge slurm: {e}", file=sys.stderr)
        return 2
    script = render(args, job)
    # SLURM opens the --output log before the script runs: its folder must exist at submission.
    Path(args.output_dir or job.output_dir).expanduser().resolve().mkdir(parents=True, exist_ok=True)
    if args.out:
        Path(args.out).write_text(script)
        Path(args.out).chmod(0o755)
        print(f"wrote {args.out}; submit with: sbatch {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(script)
    return 0
