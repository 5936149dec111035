"""The pipeline-parallel step (parallel.pp > 1): the trainer seam of trainer/step.py over stages.

Each pipeline rank builds the full model on meta, keeps a pruned copy per stage it holds
(`parallel.pipeline.build_stage_module`), applies tensor parallelism / FSDP2 to each stage as the
plain step does to the whole model, then allocates and initialises only its shards with the values
of the single-process start (sharded start, parallel/init.py), and runs the
step's accumulation micro-batches through a `torch.distributed.pipelining` schedule:

- loss: our cross-entropy on the last stage divided by the number of micro-batches, so the
  gradients are those of the mean over micro-batches, as the plain step's accumulation; MoE aux
  losses get their gradient 1 / micro-batches through `apply_aux_loss_grads`;
- after backward: tied embeddings' two copies summed (first + last stage); under
  `dp_backend=ddp` with dp > 1, gradients averaged over mesh["dp"] (FSDP2 reduces by itself);
- the loss is computed on the last stage and all-reduced so every rank returns the global mean;
- the gradient norm sums squares over this rank's stages (DTensor-aware) and over the pp mesh;
- `model` is `PipelineModelParts`: this rank's stages under the full model's parameter names, so
  the loop's Checkpointer saves and loads them with DCP unchanged, across layouts.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

from titanforge.models.registry import build_model, collect_metrics
from titanforge.parallel import parallelize
from titanforge.parallel.mesh import LayoutError, check_model_layout
from titanforge.parallel.pipeline import (
    AuxLossScale,
    HeadOnlyEmbedding,
    PipelineModelParts,
    apply_aux_loss_grads,
    apply_stage_boundaries,
    average_grads,
    build_pipeline_schedule,
    build_stage_module,
    check_pipeline_config,
    check_pipeline_microbatches,
    recv_activation,
    send_activation,
    stage_indices,
    sum_tied_grads,
    tied_embedding_group,
)
from titanforge.parallel.grad_norm import grad_norm_squared, scale_grads_
from titanforge.parallel.tp_loss import tp_cross_entropy
from titanforge.trainer.dist import all_reduce
from titanforge.trainer.optim import build_optimizer
from titanforge.trainer.step import TrainStep, autocast_for, sharded_init_fn


class PipelineTrainStep(TrainStep):
    """`optimizer_step` and `zero_grad` are TrainStep's (one optimizer over this rank's stages)."""

    def __init__(self, job, dims, mesh, info):
        cfg, t = job.parallel, job.train
        self.job, self.dims, self.info = job, dims, info
        self.n_micro = t.global_batch_size // (t.micro_batch_size * dims.dp)
        errs = check_pipeline_config(cfg) + check_model_layout(job.model, dims, cfg)
        errs += check_pipeline_microbatches(cfg, self.n_micro)
        if errs:
            raise LayoutError("pipeline layout does not fit:\n  - " + "\n  - ".join(errs))
        self.autocast = autocast_for(info.device, t.dtype)
        self.pp_group = mesh["pp"].get_group()
        self.pp, self.pp_rank = dims.pp, mesh["pp"].get_local_rank()
        self.n_stages = dims.pp * cfg.pp_virtual_stages
        self.stage_ids = stage_indices(self.pp_rank, dims.pp, cfg.pp_virtual_stages)
        self.has_first, self.has_last = 0 in self.stage_ids, self.n_stages - 1 in self.stage_ids
        self.aux_scale = AuxLossScale(1.0 / self.n_micro)

        # Sharded start: the full model and its stages are built on meta; each stage allocates and
        # initialises only this rank's shards after its layout (parallel/init.py).
        full = build_model(job.model, device="meta")
        # DDP wraps the module (and reduces over all ranks); across stage replicas the gradients are
        # averaged over mesh["dp"] after the schedule instead (`average_grads`).
        self.manual_dp = dims.dp > 1 and cfg.dp_backend != "fsdp"
        stage_dims = dataclasses.replace(dims, dp=1) if self.manual_dp else dims
        self.modules = []
        for s in self.stage_ids:
            m = build_stage_module(full, s, self.n_stages)
            apply_aux_loss_grads(m, self.aux_scale)
            m = parallelize(m, job.model.family, stage_dims, mesh, cfg, info.device,
                            activation_checkpointing=t.activation_checkpointing, compile=t.compile,
                            init_fn=sharded_init_fn(job, info.device))
            if dims.tp > 1:
                apply_stage_boundaries(m, mesh["tp"])
            self.modules.append(m)
        del full
        self.stages = [PipelineStage(m, s, self.n_stages, info.device, group=self.pp_group)
                       for m, s in zip(self.modules, self.stage_ids, strict=True)]
        n = self.n_micro

        def loss_fn(logits, targets):
            return tp_cross_entropy(logits, targets) / n

        self.schedule = build_pipeline_schedule(cfg.pp_schedule, self.stages, n, loss_fn)
        self.model = PipelineModelParts(self.modules)
        self.raw_model = self.model
        self.optimizer = build_optimizer(self.model, job.optim)

        tied = job.model.tie_embeddings
        self.tied_group = tied_embedding_group(mesh, self.n_stages, dims.pp) if tied else None
        self.tied_weights = ([m.tok_embeddings.weight for m in self.modules if m.tok_embeddings is not None]
                             if self.tied_group is not None else [])
        # Counted once in the gradient norm: the last stage's copy equals the first stage's after the sum.
        self.norm_params = [p for name, p in self.model.named_parameters()
                            if not (name == "tok_embeddings.weight"
                                    and isinstance(self.model.tok_embeddings, HeadOnlyEmbedding))]
        self.dp_group = mesh["dp"].get_group() if self.manual_dp else None

    def forward_backward(self, batches: list[torch.Tensor]) -> torch.Tensor:
        if len(batches) != self.n_micro:
            raise ValueError(f"the pipeline schedule was built for {self.n_micro} micro-batches, got {len(batches)}")
        tokens = torch.cat(batches)
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        args = (inp,) if self.has_first else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": tgt, "losses": losses} if self.has_last else {}
        with self.autocast:
            self.schedule.step(*args, **kwargs)
        if self.tied_group is not None:
            sum_tied_grads(self.tied_weights, self.tied_group)
        if self.manual_dp:
            average_grads(list(self.model.parameters()), self.dp_group, self.dims.dp)
        loss = torch.zeros((), dtype=torch.float64, device=self.info.device)
        if self.has_last:
            loss = loss + sum(lo.detach().double() for lo in losses)
        # Every last-stage rank (dp x tp of them) holds its dp shard's mean; tp replicas are equal.
        return all_reduce(loss) / (self.dims.dp * self.dims.tp)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        sq = grad_norm_squared(self.norm_params).to(self.info.device)
        dist.all_reduce(sq, group=self.pp_group)
        total = sq.sqrt()
        if math.isfinite(max_norm):
            scale_grads_(list(self.model.parameters()), max_norm, total)
        return total

    @torch.no_grad()
    def val_loss(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Forward only, stage by stage with plain P2P; (loss, 1) on last-stage ranks, (0, 0) elsewhere."""
        x = tokens[:, :-1]
        out = None
        with self.autocast:
            for s in range(self.n_stages):
                owner = s % self.pp
                if owner != self.pp_rank:
                    continue
                if s > 0:
                    x = recv_activation(self.pp_group, (s - 1) % self.pp, self.info.device)
                out = self.modules[self.stage_ids.index(s)](x)
                if s < self.n_stages - 1:
                    send_activation(out, self.pp_group, (s + 1) % self.pp)
        if self.has_last:
            return tp_cross_entropy(out, tokens[:, 1:]).double(), 1
        return torch.zeros((), dtype=torch.float64, device=self.info.device), 0

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)

    def metrics(self) -> dict:
        """Per-module metrics of every stage, gathered over the pp mesh (names are the full model's)."""
        local = {}
        for m in self.modules:
            local.update(collect_metrics(m))
        gathered = [None] * self.pp
        dist.all_gather_object(gathered, local, group=self.pp_group)
        out = {}
        for part in gathered:
            out.update(part)
        return out
