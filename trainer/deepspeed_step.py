"""The DeepSpeed ZeRO layout of the training step (`parallel.dp_backend=deepspeed`).

One `DeepSpeedEngine` (parallel/zero.py) over the whole plain model on every rank: ZeRO stage
`parallel.zero_stage` (1: optimizer state, 2: + gradients, 3: + parameters partitioned over the
data-parallel ranks), pure data parallelism (parallel/mesh.py rejects tp/pp/ep with it). The same
interface as `TrainStep` (trainer/step.py), with these differences, all because the engine owns
them:

- Accumulation: `engine.backward` divides each micro-batch's loss by the accumulation count and
  reduces at the boundary; `engine.step()` is called after every micro-batch (it only counts
  until the boundary).
- Clipping and the update are one call: the engine clips at `gradient_clipping` (from
  `optim.grad_clip`) inside `engine.step()`, and only then knows the global norm
  (`engine.get_global_grad_norm()`). So `clip_grad_norm` runs the boundary `engine.step()` and
  returns that norm; `optimizer_step` and `zero_grad` have nothing left to do. A non-finite norm
  makes ZeRO skip the update itself (its overflow check, in float32 too) and report an infinite
  norm, which the loop counts as a skipped step: the same decision, taken once.
- The learning rate: the loop's scheduler drives the client AdamW (`self.optimizer`), whose
  param groups the ZeRO optimizer steps with.
- Checkpoints: `self.model` is the engine, which trainer/checkpoint.py saves with
  `engine.save_checkpoint` instead of DCP.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from titanforge.parallel.zero import build_deepspeed_engine
from titanforge.trainer.dist import all_reduce
from titanforge.trainer.optim import build_optimizer
from titanforge.trainer.step import TrainStep, autocast_for, build_plain_model, lm_loss


class DeepSpeedTrainStep(TrainStep):
    """`val_loss`, `train` and `metrics` are TrainStep's: `self.model` is the engine."""

    def __init__(self, job, dims, mesh, info):
        t = job.train
        self.job, self.dims, self.info = job, dims, info
        if not dist.is_initialized():
            # One process: DeepSpeed still needs a process group (without one it looks for MPI)
            # and LOCAL_RANK (which torchrun would set).
            os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
            dist.init_process_group("nccl" if info.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1, device_id=info.device if info.device.type == "cuda" else None)
        self.autocast = autocast_for(info.device, t.dtype)
        # Not a sharded start: every rank builds and initialises the whole model before ZeRO
        # partitions it (docs/design.md, "Sharded start"); FSDP2 is the path for models that do not fit.
        self.raw_model = build_plain_model(job, info.device)
        if info.is_main:
            n = sum(p.numel() for p in self.raw_model.parameters())
            print(f"[start] dp_backend=deepspeed: every rank holds the whole model at start ({n * 4 / 2**30:.2f} GiB "
                  f"float32) before ZeRO-{job.parallel.zero_stage} partitions it; for a model that does not fit one "
                  f"device use parallel.dp_backend=fsdp (sharded start)", flush=True)
        # The client torch AdamW with the trainer's param groups (never a DeepSpeed-config optimizer).
        self.optimizer = build_optimizer(self.raw_model, job.optim)
        self.grad_accum = t.global_batch_size // (t.micro_batch_size * dims.dp)
        # Parameters stay float32; train.dtype=bfloat16 autocasts the forward as in TrainStep.
        self.model = build_deepspeed_engine(self.raw_model, self.optimizer, zero_stage=job.parallel.zero_stage,
                                            micro_batch_size=t.micro_batch_size, grad_accum=self.grad_accum,
                                            clip=max(job.optim.grad_clip, 0.0))
        self.engine = self.model

    def forward_backward(self, batches: list[torch.Tensor]) -> torch.Tensor:
        if len(batches) != self.grad_accum:
            raise ValueError(f"{len(batches)} micro-batches for an engine built with gradient accumulation "
                             f"{self.grad_accum}")
        loss_sum = torch.zeros((), device=self.info.device)
        for i, tokens in enumerate(batches):
            loss, total = lm_loss(self.engine, self.raw_model, tokens, self.autocast)
            # Each micro-batch's mean loss: the engine divides by grad_accum itself.
            self.engine.backward(total)
            if i < len(batches) - 1:
                # Not the boundary: only advances the engine's micro-step count.
                self.engine.step()
            loss_sum += loss.detach()
        return all_reduce(loss_sum / len(batches)) / self.info.world_size

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The boundary `engine.step()`: clip (at the configured norm), update, zero; the global norm."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("clip_grad_norm called before the last micro-batch of the step")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float("inf") if norm is None else float(norm), device=self.info.device)

    def optimizer_step(self) -> None:
        """Nothing: `engine.step()` in clip_grad_norm applied the update (see the module docstring)."""

    def zero_grad(self) -> None:
        """Nothing: the engine zeroes (or, on a skipped step, drops) the gradients in `engine.step()`."""
