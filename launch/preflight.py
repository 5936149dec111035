"""Checks of a job against the machine before any process group or model exists.

`preflight(job)` raises ConfigError (one line: the problem and the fix) for: data.path without a
prepared data set; an output_dir that cannot be written; a live run holding output_dir's lock;
checkpoints of which none verifies; a resume whose saved config differs in the model or the
schedule; less free space than the next checkpoint needs. Rank 0 of the run checks the lock and
the checkpoints again (another run may have started in between); these run first so the common
mistakes end here, with exit status 2, instead of inside torchrun.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import warnings
from contextlib import redirect_stdout
from pathlib import Path

from titanforge.launch.config import ConfigError, JobConfig, to_yaml

# Set by `titanforge train` for the ranks it starts: the checks ran already.
PREFLIGHT_ENV = "TITANFORGE_PREFLIGHT_DONE"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_output_dir(out: Path) -> Path:
    """The folder output_dir is (or will be created) in, after a real write test there."""
    base = _existing_ancestor(out)
    if not base.is_dir():
        raise ConfigError(f"output_dir={out} cannot be created: {base} is a file, not a folder; "
                          f"choose another output_dir")
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".titanforge-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"output_dir={out} is not writable ({e.strerror} in {base}); choose a folder you "
                          f"can write to (output_dir=...) or fix its permissions") from None
    return base


def _checkpoint_bytes(job: JobConfig, newest: Path | None) -> int:
    """What the next checkpoint needs: the newest one's size, or fp32 weights + two AdamW moments."""
    if newest is not None:
        return sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    from titanforge.models.registry import build_model

    n = sum(p.numel() for p in build_model(job.model, device="meta").parameters())
    return 12 * n + (1 << 20)


def _check_z_from(job: JobConfig) -> None:
    """finetune.z_from must hold one z-vector of the right length per matrix the run decomposes
    (checked on a meta model, before any rank reads a weight)."""
    from titanforge.models.registry import build_model
    from titanforge.models.svf import SVFConfig, apply_svf, svf_modules
    from titanforge.trainer.svf import read_z

    ft = job.finetune
    try:
        zs = read_z(ft.z_from)
    except ValueError as e:
        raise ConfigError(f"finetune.z_from: {e}") from None
    model = build_model(job.model, device="meta")
    try:
        apply_svf(model, SVFConfig(list(ft.targets), list(ft.exclude)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    want = {n: m.z.shape[0] for n, m in svf_modules(model).items()}
    got = {n: z.shape[0] if z.ndim == 1 else -1 for n, z in zs.items()}
    if got != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        bad = sorted(n for n in set(want) & set(got) if want[n] != got[n])
        raise ConfigError(f"finetune.z_from={ft.z_from} does not fit this model's SVF matrices (missing {missing[:3]}, "
                          f"unexpected {extra[:3]}, other length {bad[:3]}); export it from a run of the same model.* "
                          f"and finetune.targets")


def preflight(job: JobConfig) -> None:
    from titanforge.data import read_manifest
    from titanforge.trainer.checkpoint import (CheckpointError, Checkpointer, complete_checkpoints,
                                               resume_config_problem)
    from titanforge.trainer.dist import DistInfo
    from titanforge.trainer.runlock import RunLockError, check

    try:
        read_manifest(job.data.path)
    except Exception as e:  # noqa: BLE001 - DataError and OSError alike: reported in one line
        raise ConfigError(" ".join(f"data.path={job.data.path}: {e}".split())) from None
    out = Path(job.output_dir)
    base = _check_output_dir(out)
    try:
        check(out, job.checkpoint.break_lock)
    except RunLockError as e:
        raise ConfigError(str(e)) from None
    root, newest = out / "checkpoints", None
    if job.checkpoint.enabled and job.checkpoint.resume == "auto" and complete_checkpoints(root):
        import torch

        info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        # The run prints its own fallback warnings; here only the verdict matters.
        with redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                newest = Checkpointer(root, job.checkpoint, info).latest_valid(job.checkpoint.allow_fresh_start)
            except CheckpointError as e:
                raise ConfigError(str(e)) from None
        if newest is not None:
            problem, _ = resume_config_problem(newest, to_yaml(job), job.checkpoint.allow_schedule_change)
            if problem:
                raise ConfigError(problem)
    if job.finetune.method == "svf" and job.finetune.z_from:
        _check_z_from(job)
    if job.checkpoint.enabled:
        need = _checkpoint_bytes(job, newest)
        free = shutil.disk_usage(base).free
        if free < need:
            raise ConfigError(f"output_dir={out} has {free / 2**20:.1f} MiB free and the next checkpoint needs about "
                              f"{need / 2**20:.1f} MiB; free space, choose an output_dir on a larger disk, or "
                              f"checkpoint.enabled=false")


def main(argv: list[str]) -> int:
    """`python -P -m titanforge.launch.preflight [--world N] CONFIG [key=value ...]`: validate the
    config for N ranks and run the machine checks; one line and exit 2 on a problem. The batch
    script of `titanforge slurm` runs it on the head node before srun starts any rank."""
    import argparse
    import sys

    from titanforge.launch.config import load_config, validate

    p = argparse.ArgumentParser(prog="titanforge preflight")
    p.add_argument("--world", type=int, default=1, help="ranks of the whole job")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        job = load_config(args.config, args.overrides)
        validate(job, world_size=args.world)
        preflight(job)
    except ConfigError as e:
        print(f"titanforge: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
