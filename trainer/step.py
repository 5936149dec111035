"""How one layout builds its model and runs a step: the seam between the loop and the layouts.

`build_train_step(job, dims, mesh, info)` returns an object with

- `model`, `optimizer`: what checkpoints save and load (DCP state dicts by parameter name);
  `raw_model`: the plain model whose modules hold auxiliary losses and metrics;
- `forward_backward(batches) -> Tensor`: forward and backward of one optimizer step's
  micro-batches (each [micro_batch, seq_len + 1] tokens), gradients reduced as the layout needs;
  returns the global mean training loss (the same value on every rank);
- `clip_grad_norm(max_norm) -> Tensor`: the global gradient norm, clipping when finite;
- `optimizer_step()`: apply the update (the loop calls it only when loss and norm are finite);
  `zero_grad()`: drop the gradients (called after every step, applied or skipped);
- `val_loss(tokens) -> Tensor`: forward-only loss sum and count for validation, reduced by the caller;
- `metrics() -> dict`: per-module metrics of the last forward (expert load, aux losses).

`TrainStep` is the plain layout: one model replica per rank, tensor parallel inside, DDP or FSDP2
across data-parallel ranks, micro-batches accumulated with the gradient reduction only on the last.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from titanforge.models.registry import build_model, collect_aux_losses, collect_metrics
from titanforge.parallel import clip_grad_norm, finish_grad_reduction, no_grad_sync, parallelize
from titanforge.parallel.context import shard_sequence
from titanforge.parallel.init import materialize
from titanforge.parallel.tp_loss import tp_cross_entropy
from titanforge.trainer.dist import all_reduce
from titanforge.trainer.optim import build_optimizer


def autocast_for(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        ok = device.type == "cpu" or torch.cuda.is_bf16_supported()
        if ok:
            return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_plain_model(job, device: torch.device) -> torch.nn.Module:
    """The full model with its initial weights; the same seed gives the same weights on every rank
    and in every layout (per-unit seeds, parallel/init.py)."""
    torch.manual_seed(job.train.seed)
    return materialize(build_model(job.model, device="meta"), job.model, job.train.seed, device)


def sharded_init_fn(job, device: torch.device):
    """`parallelize(..., init_fn=...)` for a meta-built model: allocate and initialise this rank's
    shards, from `init.from`'s weights when given (trainer/init_from.py)."""
    torch.manual_seed(job.train.seed)
    source = (getattr(job, "init", None) or {}).get("from")
    if source:
        from titanforge.trainer.init_from import init_from_fn

        return init_from_fn(source, job.model, job.train.seed, device)
    return functools.partial(materialize, model_cfg=job.model, seed=job.train.seed, device=device)


def build_finetune_model(job, info) -> torch.nn.Module:
    """finetune.method=lora: the whole base model (init.from's weights, else the seed's) with LoRA
    applied. (SVF starts sharded instead: trainer/svf.py:SVFStart.)"""
    from titanforge.models.lora import apply_lora

    model = build_model(job.model, device="meta")
    sharded_init_fn(job, info.device)(model)
    ft = job.finetune
    apply_lora(model, ft.lora_rank, ft.lora_alpha, ft.targets, ft.exclude)
    return model


def _print_trainable(model, method: str) -> None:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"[finetune] {method}: {n_train:,} trainable of {n_all:,} parameters", flush=True)


def lm_loss(model, raw_model, tokens: torch.Tensor, autocast, fused: bool = False,
            loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, cross-entropy + auxiliary losses) of next-token prediction on `tokens`. `fused`
    (train.fused_cross_entropy): the model's head returns the loss of the targets it is handed,
    computed in chunks without the [tokens, vocab] logits (kernels/loss). `loss_mask` [B, T]
    (True = counts) keeps only some targets (task rows: the answer tokens)."""
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    if loss_mask is not None:
        tgt = tgt.masked_fill(~loss_mask, -100)
    if fused:
        raw_model.loss_targets = tgt
        try:
            with autocast:
                loss = model(inp)
        finally:
            raw_model.loss_targets = None
    else:
        with autocast:
            logits = model(inp)
        # Plain logits -> F.cross_entropy in float32; vocab-sharded logits (TP) never gathered.
        loss = tp_cross_entropy(logits, tgt)
    aux = collect_aux_losses(raw_model)
    total = loss + sum(aux.values()) if aux else loss
    return loss, total


class TrainStep:
    # No context parallelism unless __init__ says so (subclasses with their own __init__, such as
    # DeepSpeedTrainStep, inherit val_loss and its _piece).
    cp, cp_rank = 1, 0

    def __init__(self, job, dims, mesh, info):
        self.job, self.dims, self.info = job, dims, info
        self.autocast = autocast_for(info.device, job.train.dtype)
        self.svf_start = None
        if job.finetune.method == "svf":
            # Sharded start of the SVF model: built on meta with SVFLinears in place of the selected
            # matrices; after the layout each rank fills its shards and the SVD factors (its share
            # decomposed from whole base matrices read one at a time, trainer/svf.py).
            from titanforge.models.svf import SVFConfig, apply_svf
            from titanforge.trainer.svf import SVFStart

            self.raw_model = build_model(job.model, device="meta")
            apply_svf(self.raw_model, SVFConfig(list(job.finetune.targets), list(job.finetune.exclude)))
            group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
            init_fn = self.svf_start = SVFStart(job, info.device, info.rank, info.world_size, group, info.is_main)
        elif job.finetune.method == "lora":
            # LoRA wraps the full base matrices: the plain model is built whole (init.from or the
            # seed) and transformed before the layout is applied.
            self.raw_model = build_finetune_model(job, info)
            init_fn = None
        else:
            # Sharded start: built on meta, each rank allocates and initialises only its shards.
            self.raw_model = build_model(job.model, device="meta")
            init_fn = sharded_init_fn(job, info.device)
        self.model = parallelize(self.raw_model, job.model.family, dims, mesh, job.parallel, info.device,
                                 activation_checkpointing=job.train.activation_checkpointing,
                                 compile=job.train.compile, init_fn=init_fn)
        if job.finetune.method != "none" and info.is_main:
            _print_trainable(self.raw_model, job.finetune.method)
        self.optimizer = build_optimizer(self.model, job.optim)
        # Context parallelism: every rank of a cp group reads the same batches and keeps its piece
        # of each sequence; its loss is the mean over its piece (pieces hold equal token counts).
        self.cp, self.cp_rank = dims.cp, (mesh["cp"].get_local_rank() if dims.cp > 1 else 0)

    def _piece(self, tokens: torch.Tensor) -> torch.Tensor:
        return shard_sequence(tokens, self.cp_rank, self.cp) if self.cp > 1 else tokens

    def forward_backward(self, batches: list[torch.Tensor]) -> torch.Tensor:
        loss_sum = torch.zeros((), device=self.info.device)
        n = len(batches)
        for i, tokens in enumerate(batches):
            sync = i == n - 1
            # A batch is the tokens, or (tokens, loss_mask) from a task mixture (data/tasks/).
            tokens, mask = tokens if isinstance(tokens, tuple) else (tokens, None)
            with contextlib.nullcontext() if sync else no_grad_sync(self.model, self.job.parallel.dp_backend):
                loss, total = lm_loss(self.model, self.raw_model, self._piece(tokens), self.autocast,
                                      self.job.train.fused_cross_entropy, mask)
                (total / n).backward()
            loss_sum += loss.detach()
        finish_grad_reduction(self.model)
        # Tensor-parallel ranks hold the same loss and context-parallel ranks the means of equal
        # pieces: averaging over all ranks is the dp mean.
        return all_reduce(loss_sum / n) / self.info.world_size

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(self.model, max_norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def val_loss(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(loss, 1) on every rank; tensor-parallel replicas hold equal losses, so the caller's
        mean over all ranks is the data-parallel mean."""
        loss, _ = lm_loss(self.model, self.raw_model, self._piece(tokens), self.autocast, self.job.train.fused_cross_entropy)
        return loss.double(), 1

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def metrics(self) -> dict:
        return collect_metrics(self.raw_model)


def build_train_step(job, dims, mesh, info):
    """The step object for this layout (see the module docstring)."""
    if job.parallel.dp_backend == "deepspeed":
        from titanforge.trainer.deepspeed_step import DeepSpeedTrainStep

        return DeepSpeedTrainStep(job, dims, mesh, info)
    if dims.pp > 1:
        from titanforge.trainer.pipeline_step import PipelineTrainStep

        return PipelineTrainStep(job, dims, mesh, info)
    return TrainStep(job, dims, mesh, info)
