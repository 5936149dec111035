"""`titanforge slurm` (launch/slurm.py): the sbatch script, its checks, and a run of it on CPU.

The end-to-end tests run the generated script with bash as SLURM would, with stand-ins on PATH:
`srun` runs its command once here (one node) with SLURM_* set, as the real srun does per node,
and forwards signals by being replaced by that command (exec); `scontrol show hostnames` prints
localhost and `scontrol requeue` records its call. The batch environment (SLURM_JOB_ID,
SLURM_JOB_NODELIST, SLURM_NNODES) is set by the test. Training: tiny llama, 2 CPU processes
(gloo) through the script's torchrun, c10d rendezvous on localhost.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from testutil import launch_util as lu

from titanforge.launch.slurm import main as slurm_main

CONFIG = str(lu.ROOT / "configs" / "llama-tiny.yaml")
FAKE_SRUN = """\
#!/bin/bash
# Stand-in for srun on one node: drop srun's options, run the command here with SLURM_* set.
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
echo "srun $1" >> "$FAKE_SLURM_LOG"
if [[ -n "${FAKE_SRUN_PRINT_ARGS:-}" ]]; then printf '%s\\0' "$@" > "$FAKE_SRUN_PRINT_ARGS"; exit 0; fi
if [[ -n "${FAKE_SRUN_PRINT_TUNABLES:-}" ]]; then echo "${GLIBC_TUNABLES-<unset>}" > "$FAKE_SRUN_PRINT_TUNABLES"; exit 0; fi
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_STEP_ID=0
exec "$@"
"""
FAKE_SCONTROL = """\
#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then echo localhost; fi
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(tmp_path: Path, *args: str, name: str = "job.sh") -> Path:
    out = tmp_path / name
    assert slurm_main([CONFIG, *args, "--out", str(out)]) == 0
    return out


def _error(capsys, *args: str) -> str:
    assert slurm_main([CONFIG, *args]) == 2
    return capsys.readouterr().err


@pytest.fixture
def fake_slurm(tmp_path) -> dict:
    """Environment of a batch job (job 4242 on one node) with srun/scontrol stand-ins on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = lu.env()
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost",
               SLURM_NNODES="1", FAKE_SLURM_LOG=str(tmp_path / "slurm_calls.log"))
    return env


def test_gpu_script_holds_the_expected_lines(tmp_path):
    script = _write(tmp_path, "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "12:00:00",
                    "--account", "proj1", "--job-name", "llama", "--output-dir", str(tmp_path / "run"),
                    "train.global_batch_size=64").read_text()
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    for line in ("#!/bin/bash", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj1", "#SBATCH --job-name=llama", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path / 'run'}/slurm-%j.out",
                 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'):
        assert line in script.splitlines(), line
    for flag in ('--nnodes="$SLURM_NNODES"', "--nproc-per-node=8", "--rdzv-backend=c10d",
                 '--rdzv-endpoint="$HEAD:$PORT"', '--rdzv-id="$SLURM_JOB_ID"',
                 "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=100",
                 f"output_dir={tmp_path / 'run'}", "PYTHON=", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert flag in script, flag
    # The log folder exists at submission (SLURM opens the log before the script runs).
    assert (tmp_path / "run").is_dir()


def test_cpu_script_requests_no_gpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = _write(tmp_path, "--nodes", "1", "--nproc-per-node", "2").read_text()
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    assert "--gpus-per-node" not in script and "--nproc-per-node=2" in script
    assert "#SBATCH --cpus-per-task=16" in script
    # The config's output_dir, made absolute.
    assert f"output_dir={(tmp_path / 'runs' / 'llama-tiny').resolve()}" in script


def test_overrides_reach_the_trainer_quoted_as_given(tmp_path, fake_slurm):
    """Run the script with an srun that records its arguments: every override arrives as one argument."""
    tricky = ["wandb.name=it's a \"run\" $HOME `x`", "wandb.tags=[a, 'b c']", "train.steps=7"]
    script = _write(tmp_path, "--nodes", "1", "--nproc-per-node", "2", "--port", "29999",
                    "--output-dir", str(tmp_path / "o p"), *tricky)
    args_file = tmp_path / "args.bin"
    # No prepared data here: the stand-in srun only records its arguments, so the preflight is skipped.
    proc = subprocess.run(["bash", str(script), "train.seed=3"], env={**fake_slurm, "FAKE_SRUN_PRINT_ARGS": str(args_file),
                                                                     "TITANFORGE_PREFLIGHT_DONE": "1"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = args_file.read_text().split("\0")[:-1]
    assert args[args.index("titanforge.launch.train") + 1:] == [CONFIG, *tricky, f"output_dir={tmp_path / 'o p'}",
                                                                 "train.seed=3"]
    assert "--rdzv-endpoint=localhost:29999" in args and "--rdzv-id=4242" in args and "--nnodes=1" in args
    assert "scontrol requeue" not in Path(fake_slurm["FAKE_SLURM_LOG"]).read_text()


@pytest.mark.parametrize("env,expected", [
    ({}, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.check=0"}, "glibc.malloc.check=0:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc.malloc.hugetlb=0"),
    ({"TITANFORGE_HUGE_PAGES": "0"}, "<unset>"),
])
def test_ranks_start_with_huge_page_malloc(tmp_path, fake_slurm, env, expected):
    """The ranks get glibc's huge-page tunable as `titanforge train`'s own ranks do (trainer/cpu_env),
    unless the user set one or turned it off."""
    script = _write(tmp_path, "--nodes", "1", "--nproc-per-node", "2", "--port", "29999")
    out = tmp_path / "tunables.txt"
    base = {k: v for k, v in fake_slurm.items() if k not in ("GLIBC_TUNABLES", "TITANFORGE_HUGE_PAGES")}
    proc = subprocess.run(["bash", str(script)], env={**base, **env, "FAKE_SRUN_PRINT_TUNABLES": str(out),
                                                      "TITANFORGE_PREFLIGHT_DONE": "1"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_text().strip() == expected


def test_batch_script_preflight_stops_bad_input_before_any_rank(tmp_path, fake_slurm):
    """A job whose data is missing ends on the head node with one line and status 2; srun never runs."""
    script = _write(tmp_path, "--nodes", "1", "--nproc-per-node", "2", "--port", "29999",
                    f"data.path={tmp_path / 'no-data'}")
    proc = subprocess.run(["bash", str(script)], env=fake_slurm, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("titanforge:")]
    assert len(lines) == 1 and "data.path=" in lines[0] and "no-data" in lines[0], proc.stderr
    log = Path(fake_slurm["FAKE_SLURM_LOG"])
    assert not log.exists() or "srun" not in log.read_text()


@pytest.mark.parametrize("args,message", [
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes 0 must be >= 1"),
    (["--nodes", "1", "--gpus-per-node", "0"], "--gpus-per-node 0 must be >= 1"),
    (["--nodes", "1", "--gpus-per-node", "2", "--partition", "gpu;rm -rf /"], "is not a SLURM partition name"),
    (["--nodes", "1", "--gpus-per-node", "2", "--time", "12h"], "must be HH:MM:SS or D-HH:MM:SS"),
    (["--nodes", "1", "--gpus-per-node", "2", "--time", "00:03:00"], "longer than twice --signal-lead"),
    (["--nodes", "1", "--gpus-per-node", "2", "--account", "a b"], "--account 'a b' may hold only"),
    (["--nodes", "2", "--gpus-per-node", "2", "parallel.tp=4", "model.n_kv_heads=4", "parallel.dp_backend=fsdp"],
     "parallel.tp=4 does not divide --gpus-per-node 2: a tensor-parallel group stays inside one node"),
    (["--nodes", "2", "--gpus-per-node", "4"], "2 nodes x 4 processes = 8 ranks: invalid config"),
    (["--nodes", "1", "--gpus-per-node", "2", "parallel.dp_backend=deepspeed", "parallel.tp=2"],
     "dp_backend=deepspeed runs pure data parallelism"),
    (["--nodes", "1", "--gpus-per-node", "2", "train.stepz=3"], "unknown config key 'train.stepz'"),
])
def test_bad_input_is_rejected_with_the_fix(capsys, args, message):
    assert message in _error(capsys, *args)


def test_missing_config_is_named(capsys):
    assert slurm_main(["configs/nope.yaml", "--nodes", "1", "--gpus-per-node", "1"]) == 2
    assert "config file configs/nope.yaml does not exist" in capsys.readouterr().err


def _run_args(data: Path, out: Path) -> list[str]:
    return [f"data.path={data}", f"output_dir={out}", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
            "model.n_kv_heads=2", "model.max_seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.val_every=0", "optim.warmup_steps=2", "checkpoint.every=1000", "wandb.mode=disabled"]


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(shakespeare64, tmp_path, fake_slurm):
    """USR1 to the batch shell (what --signal=B:USR1 does) -> srun -> torchrun -> workers: save, exit 0, requeue."""
    out = tmp_path / "run"
    script = _write(tmp_path, "--nodes", "1", "--nproc-per-node", "2", "--port", str(_free_port()),
                    *_run_args(shakespeare64, out))
    proc = subprocess.Popen(["bash", str(script), "train.steps=500"], env=fake_slurm, cwd=lu.ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lu.wait_for_step(proc, out, 2, timeout=120)
        os.kill(proc.pid, signal.SIGUSR1)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            lu.kill_job(proc)
    assert proc.returncode == 0, log
    last = max(lu.losses(out))
    assert 2 <= last < 500
    assert "[slurm] USR1: checkpoint and stop" in log
    assert f"[stop] preemption signal: saved step {last}, exiting" in log
    # The trainer finished its loop and reported (it was not killed by torchrun's shutdown timeout).
    assert f"[done] step {last} (preempted)" in log
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == [f"step_{last:08d}"]
    assert json.loads((out / "checkpoints" / saved[0] / "meta.json").read_text())["world_size"] == 2
    calls = Path(fake_slurm["FAKE_SLURM_LOG"]).read_text().splitlines()
    assert calls.count("scontrol requeue 4242") == 1 and "scontrol show hostnames localhost" in calls

    # The requeued job: the same script, the same output_dir, resumes and finishes (no second requeue).
    # (A shorter train.steps than saved is a schedule change: applied explicitly, not silently.)
    again = subprocess.run(["bash", str(script), f"train.steps={last + 2}", "checkpoint.allow_schedule_change=true"],
                           env={**fake_slurm, "SLURM_RESTART_COUNT": "1"}, cwd=lu.ROOT, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"[resume] from {out / 'checkpoints' / saved[0]} at step {last}" in again.stdout
    assert max(lu.losses(out)) == last + 2
    assert Path(fake_slurm["FAKE_SLURM_LOG"]).read_text().count("requeue") == 1
