"""torchrun worker for tests/parallel/test_zero.py: DeepSpeed ZeRO 1/2/3 (parallel/zero.py) vs one process.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/parallel/fsdp_zero_worker.py OUT CASE...

CASE is `family:stage:grad_accum:clip:offload`, e.g. `llama:3:1:0:0`. Per case one engine over a tiny model,
client AdamW: the first step's loss and every parameter's full gradient, then STEPS steps' losses.
CASE `resume:family:stage`: a DeepSpeed checkpoint saved after 2 steps resumes into a fresh engine.
Rank 0 computes the single-process reference and writes OUT/result.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_cases as cases  # noqa: E402

from titanforge.parallel.zero import build_deepspeed_engine, full_grad  # noqa: E402


def run_case(family: str, stage: int, accum: int, clip: float, offload: bool) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = world * accum
    inputs, targets = cases.global_batch()
    ref_losses, ref_params = None, {}
    if rank == 0:
        ref_losses = cases.reference_training(cases.build(family), micro, clip)
        ref = cases.build(family)
        cases.reference_step(ref, inputs, targets, micro)
        ref_params = dict(ref.named_parameters())
    model = cases.build(family)
    engine = build_deepspeed_engine(model, cases.optimizer(model), zero_stage=stage,
                                    micro_batch_size=cases.GLOBAL_BATCH // micro, grad_accum=accum, clip=clip,
                                    offload_optimizer=offload)
    # DeepSpeed's comm backend: its CPU shared-memory op must not have been built (parallel/zero.py).
    shm_op = getattr(deepspeed.comm.comm.cdb, "shm_comm_op", "no backend")
    local = list(zip(cases.shard(inputs, rank, world).chunk(accum), cases.shard(targets, rank, world).chunk(accum)))
    losses, worst, worst_name, missing = [], 0.0, "", []
    for step in range(cases.STEPS):
        total = torch.zeros(())
        for i, (x, y) in enumerate(local):
            loss = cases.loss_fn(engine, x, y)
            engine.backward(loss)
            total += loss.detach() / (accum * world)
            if step == 0 and i == accum - 1:
                # Full gradients exist after the window's last backward, before the optimizer step.
                for name, p in engine.module.named_parameters():
                    grad = full_grad(p)
                    if rank:
                        continue
                    if grad is None:
                        missing.append(name)
                    elif (err := cases.rel_err(grad, ref_params[name].grad)) >= worst:
                        worst, worst_name = err, name
            engine.step()
        dist.all_reduce(total)
        losses.append(total.item())
    engine.destroy()
    return {"losses": losses, "ref_losses": ref_losses, "grad_rel_err": worst, "worst_param": worst_name,
            "missing_grads": missing, "shm_op_built": shm_op is not None}


def resume_case(out: Path, family: str, stage: int) -> dict:
    """DeepSpeed's own checkpoint: save after 2 steps, resume a fresh engine, the same next 3 losses."""
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs, targets = cases.global_batch()
    x, y = cases.shard(inputs, rank, world), cases.shard(targets, rank, world)
    runs = []
    for seed, load in ((0, False), (123, True)):
        model = cases.build(family, seed=seed)
        engine = build_deepspeed_engine(model, cases.optimizer(model), zero_stage=stage,
                                        micro_batch_size=x.shape[0], clip=1.0)
        if load:
            engine.load_checkpoint(str(out / "ds_ckpt"), tag="step2")
        losses = []
        for step in range(3 if load else 5):
            if step == 2 and not load:
                engine.save_checkpoint(str(out / "ds_ckpt"), tag="step2")
            loss = cases.loss_fn(engine, x, y)
            engine.backward(loss)
            engine.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item() / world)
        runs.append(losses[-3:])
        engine.destroy()
    return {"uninterrupted": runs[0], "resumed": runs[1]}


def main() -> None:
    out, specs = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = {}
    for spec in specs:
        if spec.startswith("resume:"):
            _, family, stage = spec.split(":")
            result[spec] = resume_case(out, family, int(stage))
            continue
        family, stage, accum, clip, offload = spec.split(":")
        result[spec] = run_case(family, int(stage), int(accum), float(clip), offload == "1")
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    cases.worker_main(main)
