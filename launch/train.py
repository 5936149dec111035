"""Training entry point for every rank: `torchrun ... -m titanforge.launch.train CONFIG [key=value ...]`.

Loads and validates the job config (against WORLD_SIZE, before any process group or model
exists), then runs `titanforge.trainer.train`. Config errors exit with status 2 and a message
that names the key and the fix.
"""

from __future__ import annotations

import os
import sys

from titanforge.launch.config import ConfigError, load_config, to_yaml, validate
from titanforge.launch.preflight import PREFLIGHT_ENV, preflight


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = argv.pop(0) if argv and "=" not in argv[0] else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        job = load_config(preset, argv)
        validate(job, world_size=world)
        # `titanforge train` ran the machine checks before starting torchrun (PREFLIGHT_ENV).
        if world == 1 and not os.environ.get(PREFLIGHT_ENV):
            preflight(job)
    except ConfigError as e:
        if rank0:
            print(f"titanforge: {e}", file=sys.stderr)
        return 2
    from titanforge.trainer import train
    from titanforge.trainer.checkpoint import CheckpointError, CheckpointSpaceError
    from titanforge.trainer.dist import shutdown
    from titanforge.trainer.runlock import RunLockError

    if int(os.environ.get("RANK", "0")) == 0:
        from titanforge.launch.plan import param_counts

        total, active = param_counts(job.model)
        more = f" ({active / 1e6:,.1f}M active per token)" if active != total else ""
        print(f"[model] {job.model.family}: {total / 1e6:,.1f}M parameters{more}", flush=True)

    try:
        result = train(job, config_yaml=to_yaml(job))
    except (CheckpointError, RunLockError) as e:
        # Found by rank 0 once the run started (another run took the lock in between, a checkpoint
        # that does not fit the model, a full disk during a save): one line, no traceback.
        if rank0:
            print(f"titanforge: {e}", file=sys.stderr, flush=True)
        return 1 if isinstance(e, CheckpointSpaceError) else 2
    finally:
        # Tear the process group down before interpreter exit: a gloo group left to static
        # destruction can abort the process ("terminate called without an active exception")
        # after training has finished and saved, which torchrun reports as a failed run.
        shutdown()
    return 0 if result.stop_reason in ("done", "preempted") else 1


if __name__ == "__main__":
    # A preemption signal during start-up is kept for the training loop, not lost.
    from titanforge.trainer.signals import catch_early

    catch_early()
    # A W&B service address inherited from whoever started us belongs to another process (whose
    # service may still hold this run's id: "run ID is in use"); each rank 0 starts its own.
    os.environ.pop("WANDB_SERVICE", None)
    code = main()
    # The run has returned: tracker finished, checkpoint writes joined, process group destroyed.
    # Leave without the interpreter's teardown: a rank sometimes still aborted there ("terminate
    # called without an active exception", gloo's C++ threads destroyed during finalisation,
    # pytorch/pytorch#179291) after printing [done], and torchrun reported the finished run as
    # failed. The gloo test workers leave the same way (tests/parallel/fsdp_cases.worker_main).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
