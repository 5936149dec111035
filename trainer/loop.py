"""The training loop: build, resume, step, log, validate, checkpoint, stop.

`train(job, config_yaml=...)` runs on every rank (under torchrun) or in one process. A step is
`global_batch_size` sequences: `micro_batch_size` per forward, accumulated over
global / (micro * dp) micro-batches, gradients averaged over the data-parallel ranks.
A step whose loss or gradient is not finite is skipped (no optimizer update) and counted; after
`train.max_consecutive_nonfinite` in a row the run stops without writing a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from titanforge.data import build_train_loader, build_val_loader, read_manifest
from titanforge.models.registry import build_model
from titanforge.parallel import LayoutError, ParallelDims, build_mesh
from titanforge.trainer.checkpoint import CheckpointError, Checkpointer, resume_config_problem
from titanforge.data.tasks.mixture import TaskMixture, build_tasks
from titanforge.trainer.dist import DistInfo, all_reduce, broadcast_object, init_distributed
from titanforge.trainer.evaluate import Evaluator
from titanforge.trainer.optim import build_scheduler
from titanforge.trainer.cpu_env import huge_pages_on
from titanforge.trainer.perf import cpu_peak, keep_freed_memory, peak_flops, peak_memory_gib
from titanforge.trainer.runlock import RunLock, RunLockError
from titanforge.trainer.signals import PreemptionWatcher
from titanforge.trainer.step import build_train_step
from titanforge.trainer.tracking import Tracker, format_line


@dataclass
class TrainResult:
    # Global mean training loss per optimizer step (1-based), as logged.
    losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    last_step: int = 0
    # done | preempted | nonfinite
    stop_reason: str = "done"
    skipped_steps: int = 0
    resumed_from: str | None = None
    checkpoint_dir: str | None = None
    wandb_dir: str | None = None
    wandb_run_id: str | None = None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_data(job, manifest: dict) -> None:
    m = job.model
    if manifest["vocab_size"] > m.vocab_size:
        raise ValueError(f"the data's tokenizer has {manifest['vocab_size']} tokens but model.vocab_size="
                         f"{m.vocab_size}; set model.vocab_size>={manifest['vocab_size']} "
                         f"(e.g. {64 * math.ceil(manifest['vocab_size'] / 64)})")
    if manifest["seq_len"] > m.max_seq_len:
        raise ValueError(f"the data's sequences have {manifest['seq_len']} tokens but model.max_seq_len="
                         f"{m.max_seq_len}; raise model.max_seq_len or prepare with a shorter --seq-len")


@torch.no_grad()
def evaluate(step_fn, val_loader, n_batches: int, device) -> float:
    step_fn.train(False)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i, batch in enumerate(val_loader):
        if i >= n_batches:
            break
        loss, n = step_fn.val_loss(batch["tokens"].to(device))
        total += loss
        count += n
    step_fn.train(True)
    stats = all_reduce(torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)]))
    return (stats[0] / stats[1].clamp(min=1)).item()


def train(job, *, config_yaml: str = "", info: DistInfo | None = None) -> TrainResult:
    t, out = job.train, Path(job.output_dir)
    kept = t.keep_freed_memory and keep_freed_memory()
    info = info or init_distributed(t.device, job.parallel.backend)
    # Before the first op starts intra-op threads, which inherit the setting.
    flushing = t.flush_denormal and info.device.type == "cpu" and torch.set_flush_denormal(True)
    if info.is_main and info.device.type == "cpu":
        # Huge pages come from the environment glibc started with (launch/cli.py sets it).
        huge = huge_pages_on(os.environ)
        print(f"[cpu] freed memory kept: {'on' if kept else 'off'} | huge pages: {'on' if huge else 'off'} | "
              f"denormals flushed: {'on' if flushing else 'off'} | "
              f"{'configured peak' if t.peak_tflops > 0 else cpu_peak(dtype=t.dtype).describe()}", flush=True)
    try:
        return _train(job, t, out, info, config_yaml)
    finally:
        if flushing:
            torch.set_flush_denormal(False)


def _on_device(batch: dict, device):
    """The tokens, or (tokens, loss_mask) when the batch comes from a task mixture."""
    tokens = batch["tokens"].to(device, non_blocking=True)
    if "loss_mask" in batch:
        return tokens, batch["loss_mask"].to(device, non_blocking=True)
    return tokens


def _train(job, t, out: Path, info: DistInfo, config_yaml: str) -> TrainResult:
    # One run per output directory: rank 0 takes the lock before anything is written there.
    lock, problem = None, None
    if info.is_main:
        try:
            lock = RunLock(out, job.checkpoint.break_lock)
        except RunLockError as e:
            problem = str(e)
    problem = broadcast_object(problem)
    if problem:
        raise RunLockError(problem)
    try:
        return _run(job, t, out, info, config_yaml)
    finally:
        if lock is not None:
            lock.release()


def _apply_schedule_changes(scheduler, optimizer, cfg, changes: list[str], step: int) -> None:
    """checkpoint.allow_schedule_change: the new lr / schedule / optimizer values hold from the
    resumed step on (the loaded scheduler and optimizer state carry the saved ones)."""
    # Decaying groups are those with weight decay (trainer/optim.param_groups puts them first).
    decaying = [g for g in optimizer.param_groups if g["weight_decay"] != 0] or optimizer.param_groups[:1]
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.lr
        g["betas"], g["eps"] = (cfg.beta1, cfg.beta2), cfg.eps
    for g in decaying:
        g["weight_decay"] = cfg.weight_decay
    scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
    for g, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        g["lr"] = base * fn(scheduler.last_epoch)
    print(f"[resume] schedule changed as allowed (checkpoint.allow_schedule_change=true): {'; '.join(changes)}; "
          f"applied from step {step + 1} on (lr {optimizer.param_groups[0]['lr']:.3e})", flush=True)


def _run(job, t, out: Path, info: DistInfo, config_yaml: str) -> TrainResult:
    dims = ParallelDims.from_config(job.parallel, info.world_size)
    mesh = build_mesh(dims, info.device.type)
    # Every tensor-parallel, context-parallel (and pipeline) rank of a data-parallel group reads the
    # same batches.
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    manifest = read_manifest(job.data.path)
    _check_data(job, manifest)
    seq_len = manifest["seq_len"]
    if dims.cp > 1:
        from titanforge.parallel.context import check_context

        errs = check_context(job.model, dims.cp, seq_len, split=job.parallel.cp_split)
        if errs:
            raise LayoutError(errs[0])

    step_fn = build_train_step(job, dims, mesh, info)
    model, optimizer = step_fn.model, step_fn.optimizer
    scheduler = build_scheduler(optimizer, job.optim, t.steps)

    loader = build_train_loader(job.data, micro_batch_size=t.micro_batch_size, dp_rank=dp_rank,
                                dp_size=dims.dp, seed=t.seed)
    if job.data.tasks.names:
        loader = TaskMixture(loader, job.data.tasks, build_tasks(job.data.tasks, job.data.path, "train"), t.seed)
    evaluator = Evaluator.from_job(job, info, dp_rank, dims.dp) if job.eval.every and job.eval.suites else None
    ckpt = Checkpointer(out / "checkpoints", job.checkpoint, info)
    result = TrainResult(checkpoint_dir=str(out / "checkpoints"))
    step, skipped, run_id = 0, 0, None
    if job.checkpoint.enabled and job.checkpoint.resume == "auto":
        latest = ckpt.latest_valid(job.checkpoint.allow_fresh_start)
        if latest is not None:
            problem, changes = (resume_config_problem(latest, config_yaml, job.checkpoint.allow_schedule_change)
                                if info.is_main else (None, []))
            problem, changes = broadcast_object((problem, changes))
            if problem:
                raise CheckpointError(problem)
            rank_state, meta = ckpt.load(latest, model, optimizer)
            scheduler.load_state_dict(rank_state["scheduler"])
            if changes:
                _apply_schedule_changes(scheduler, optimizer, job.optim, changes, meta["step"])
            loader.load_state_dict(rank_state["data"])
            if "rng" in rank_state:
                _set_rng_state(rank_state["rng"])
            step, skipped, run_id = meta["step"], meta.get("skipped_steps", 0), meta.get("wandb_run_id")
            result.resumed_from = str(latest)
            if info.is_main:
                print(f"[resume] from {latest} at step {step}", flush=True)

    tracker = Tracker(out, job.wandb, enabled=info.is_main, run_id=run_id,
                      config=dataclasses.asdict(job) if dataclasses.is_dataclass(job) else {},
                      resume_step=step, resumed_from=result.resumed_from)
    ckpt.on_commit = tracker.commit
    run_id = broadcast_object(tracker.run_id)
    result.wandb_dir, result.wandb_run_id = tracker.wandb_dir, run_id
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)

    accum = t.global_batch_size // (t.micro_batch_size * dims.dp)
    tokens_per_step = t.global_batch_size * seq_len
    # From the whole model (built on meta: no memory), whatever part of it this rank holds.
    flops_per_token = build_model(job.model, device="meta").flops_per_token(seq_len)
    peak = peak_flops(info.device, t.peak_tflops, t.dtype)
    clip = job.optim.grad_clip if job.optim.grad_clip > 0 else float("inf")
    watcher = PreemptionWatcher()
    data_iter = iter(loader)
    consecutive_bad = 0
    preempted = False

    def save(at_step: int) -> None:
        rank_state = {"data": loader.state_dict(), "rng": _rng_state(), "scheduler": scheduler.state_dict()}
        ckpt.save(at_step, model, optimizer, rank_state,
                  {"wandb_run_id": run_id, "skipped_steps": skipped}, config_yaml)

    ended = False
    try:
        while step < t.steps:
            t0 = time.perf_counter()
            batches = [_on_device(next(data_iter), info.device) for _ in range(accum)]
            loss_mean = step_fn.forward_backward(batches)
            grad_norm = step_fn.clip_grad_norm(clip)
            finite = bool(torch.isfinite(loss_mean).item() and torch.isfinite(grad_norm).item())
            if finite:
                step_fn.optimizer_step()
                consecutive_bad = 0
            else:
                skipped += 1
                consecutive_bad += 1
            step_fn.zero_grad()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            tok_s = tokens_per_step / dt
            # Data quality: shards skipped as corrupt and their samples (the most any rank saw).
            data_bad = all_reduce(torch.tensor([loader.stats["corrupt_shards"], loader.stats["skipped_samples"]],
                                               dtype=torch.int64, device=info.device),
                                  op=torch.distributed.ReduceOp.MAX).tolist()
            metrics = {"loss": loss_mean.item(), "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": tok_s,
                       "mfu": tok_s / info.world_size * flops_per_token / peak,
                       "peak_mem_gib": peak_memory_gib(info.device), "skipped": not finite,
                       "skipped_total": skipped, "corrupt_shards": int(data_bad[0]),
                       "skipped_samples": int(data_bad[1]), **step_fn.metrics()}
            result.losses[step] = metrics["loss"]
            result.last_step = step
            if info.is_main and (step % t.log_every == 0 or not finite):
                print(format_line(step, metrics), flush=True)
            tracker.log(step, metrics)
            if consecutive_bad >= t.max_consecutive_nonfinite:
                result.stop_reason = "nonfinite"
                if info.is_main:
                    fix = (f"lower optim.lr (now {job.optim.lr:g}; gradients are already clipped at "
                           f"optim.grad_clip={job.optim.grad_clip:g}) or check the data"
                           if job.optim.grad_clip > 0 else "lower optim.lr or enable optim.grad_clip (e.g. 1.0)")
                    print(f"[stop] {consecutive_bad} non-finite steps in a row at step {step}; no checkpoint "
                          f"written (the last good one is kept). {fix[0].upper() + fix[1:]}.", flush=True)
                break
            if t.val_every and step % t.val_every == 0:
                val_loader = build_val_loader(job.data, micro_batch_size=t.micro_batch_size, dp_rank=dp_rank,
                                              dp_size=dims.dp)
                val = evaluate(step_fn, val_loader, t.val_batches, info.device)
                result.val_losses[step] = val
                tracker.log(step, {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))})
                if info.is_main:
                    print(f"[val] step {step} | loss {val:.4f} | ppl {math.exp(min(val, 50.0)):.2f}", flush=True)
            if evaluator is not None and step % job.eval.every == 0:
                step_fn.train(False)
                evaluator.run(step_fn.model, step, tracker, out / "eval")
                step_fn.train(True)
            preempted = watcher.should_stop(info.device)
            # Never checkpoint right after a skipped step (unless preempted: a skipped step leaves the
            # weights as they were, so what is saved is the last good state).
            due = finite and (step % job.checkpoint.every == 0 or step == t.steps)
            if job.checkpoint.enabled and (due or preempted):
                save(step)
            if preempted:
                result.stop_reason = "preempted"
                if info.is_main:
                    print(f"[stop] preemption signal: saved step {step}, exiting", flush=True)
                break
        ckpt.close()
        ended = True
    finally:
        try:
            if not ended:
                ckpt.close()
        finally:
            watcher.restore()
            tracker.finish(clean=ended)
    if info.is_main:
        print(f"[done] step {step} ({result.stop_reason}); checkpoints: {result.checkpoint_dir}; "
              f"W&B run {run_id}: {result.wandb_dir or 'disabled'}", flush=True)
    return result
