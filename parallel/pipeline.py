"""Pipeline parallelism: the model cut into stages of contiguous layers, run by a schedule.

torchtitan's approach (`distributed/pipeline_parallel.py`: `pipeline_module_split`,
`build_pipeline_schedule`) on our `CausalLM`: every stage is a copy of the full model pruned to
its layers, so parameter names (`layers.3.attention.wq.weight`) are the full model's and DCP
checkpoints load across layouts (pp=2 <-> one process <-> dp=2). The first stage keeps the token
embedding, the last the final norm and the LM head; `CausalLM.embed` / `head` pass hidden states
through where a stage lacks them, so the family's own `forward` is the stage forward:
tokens [B, T] -> hidden [B, T, C] (first), hidden -> hidden (middle), hidden -> logits [B, T, V] (last).

- Split (`split_layers`): balanced and contiguous; the first `n_layers % n_stages` stages take one
  layer more. Any boundary is valid for every family, hybrids included: each block of `layers` is
  self-contained (Jamba's Mamba/attention mixer and its dense or MoE feed-forward live in the same
  block, Titans' memory and attention too), and the only thing passed between blocks is the
  residual stream. So a Jamba stage may start on an attention or a Mamba layer.
- Schedules: 1F1B and GPipe (one stage per rank), interleaved 1F1B (`pp_virtual_stages` >= 2
  stages per rank, stage i on pp rank i % pp). The micro-batches are the step's accumulation
  micro-batches.
- Tied embeddings: the last stage holds its own copy of the embedding matrix for the head
  (`HeadOnlyEmbedding`: same name `tok_embeddings.weight`, forward passes hidden states through).
  Both copies start equal; after backward their gradients are summed over the first and last
  stage (`sum_tied_grads`) so both hold the full gradient and stay equal after every step.
- MoE auxiliary losses: the schedule backpropagates only the loss of the last stage, so
  `apply_aux_loss_grads` adds the aux losses' gradient in the stage output's backward (Megatron's
  `MoEAuxLossAutoScaler`), through a forward hook on the stage. The balance loss pools the stage's
  MoE layers (HF pools the whole model's; stages cannot see each other's routing mid-schedule),
  weighted by the stage's share of the MoE layers.
- Tensor parallel inside a stage: the residual stream between stages is sent as the local
  sequence shard and re-wrapped as a DTensor (`Shard(1)`) on arrival (`apply_stage_boundaries`).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from titanforge.models.registry import collect_aux_losses
from titanforge.parallel.config import ParallelConfig
from titanforge.parallel.mesh import LayoutError

SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")


def check_pipeline_config(cfg: ParallelConfig) -> list[str]:
    """Problems of the pipeline settings alone (for pp > 1); messages say what to set."""
    if cfg.pp_schedule not in SCHEDULES:
        return [f"parallel.pp_schedule={cfg.pp_schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}"]
    if cfg.pp_schedule == "interleaved_1f1b" and cfg.pp_virtual_stages < 2:
        return [f"parallel.pp_schedule=interleaved_1f1b needs parallel.pp_virtual_stages >= 2 model chunks per "
                f"rank (got {cfg.pp_virtual_stages}); set parallel.pp_virtual_stages=2 or use "
                f"parallel.pp_schedule=1f1b"]
    if cfg.pp_schedule != "interleaved_1f1b" and cfg.pp_virtual_stages != 1:
        return [f"parallel.pp_schedule={cfg.pp_schedule} runs one stage per rank but parallel.pp_virtual_stages="
                f"{cfg.pp_virtual_stages}; set parallel.pp_virtual_stages=1 or parallel.pp_schedule=interleaved_1f1b"]
    return []


def check_pipeline_microbatches(cfg: ParallelConfig, n_microbatches: int) -> list[str]:
    """Problems of running `n_microbatches` (train.global_batch_size / (micro_batch_size * dp)) per step."""
    pp = cfg.pp
    if pp <= 1:
        return []
    if cfg.pp_schedule == "1f1b" and n_microbatches < pp:
        return [f"parallel.pp_schedule=1f1b needs at least pp={pp} micro-batches per step, got {n_microbatches} "
                f"(train.global_batch_size / (train.micro_batch_size * dp)); raise train.global_batch_size or "
                f"lower train.micro_batch_size"]
    if cfg.pp_schedule == "interleaved_1f1b" and n_microbatches % pp:
        return [f"parallel.pp_schedule=interleaved_1f1b needs the micro-batches per step ({n_microbatches}) to be a "
                f"multiple of pp={pp}; set train.global_batch_size to a multiple of "
                f"{pp} * train.micro_batch_size * dp"]
    return []


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Layer indices of each stage: contiguous, sizes differing by at most one (earlier stages larger).

    Every boundary is valid for every family (see the module docstring): blocks are self-contained.
    """
    if n_stages < 1 or n_stages > n_layers:
        raise LayoutError(f"cannot split {n_layers} layers into {n_stages} pipeline stages; use between 1 and "
                          f"{n_layers} stages (parallel.pp x parallel.pp_virtual_stages)")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (s < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out


def stage_indices(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """The stages held by pipeline rank `pp_rank`: i, i + pp, ... (round robin, as interleaved 1F1B needs)."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


class HeadOnlyEmbedding(nn.Embedding):
    """The last stage's copy of a tied embedding: the head multiplies by its weight; as the
    model's `tok_embeddings` (so the name stays `tok_embeddings.weight`) it passes hidden states on."""

    head_only = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


def build_stage_module(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """A copy of `model` (a CausalLM) holding only stage `stage`'s layers; parameter names unchanged."""
    n_layers = len(model.layers)
    keep = {str(i) for i in split_layers(n_layers, n_stages)[stage]}
    first, last = stage == 0, stage == n_stages - 1
    tied = getattr(model, "output", None) is None
    # Modules mapped to None in the memo are not copied (dropped layers, unused embedding or head).
    memo = {id(block): None for name, block in model.layers.items() if name not in keep}
    drop_embedding = not first and not (last and tied)
    if drop_embedding:
        memo[id(model.tok_embeddings)] = None
    if not last:
        memo[id(model.norm)] = None
        if model.output is not None:
            memo[id(model.output)] = None
    stage_model = copy.deepcopy(model, memo)
    for name in [n for n in stage_model.layers.keys() if n not in keep]:
        del stage_model.layers[name]
    if drop_embedding:
        stage_model.tok_embeddings = None
    elif not first:
        stage_model.tok_embeddings.__class__ = HeadOnlyEmbedding
    if not last:
        stage_model.norm = None
        stage_model.output = None
    return stage_model


class PipelineModelParts(nn.Module):
    """This rank's stage modules seen as one module with the full model's parameter names, for the
    optimizer and DCP checkpoints (`layers.{i}` of every local stage, plus embedding / norm / head
    where held). It shares the stages' parameters and is never called."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        for attr in ("tok_embeddings",):
            held = [getattr(s, attr) for s in stages if getattr(s, attr, None) is not None]
            if held:
                setattr(self, attr, held[0])
        self.layers = nn.ModuleDict()
        for s in stages:
            for name, block in s.layers.items():
                self.layers[name] = block
        for attr in ("norm", "output"):
            held = [getattr(s, attr) for s in stages if getattr(s, attr, None) is not None]
            if held:
                setattr(self, attr, held[0])
        self.stages = stages

    def forward(self, *args, **kwargs):
        raise RuntimeError("PipelineModelParts holds parameters for the optimizer and checkpoints; run the "
                           "pipeline schedule instead")


class _AddAuxLossGrad(torch.autograd.Function):
    """Identity on the module output; in backward, gives the aux loss the gradient `scale` (Megatron's
    MoEAuxLossAutoScaler): the aux loss then trains the router as if it were added to the final loss."""

    @staticmethod
    def forward(ctx, output, aux, scale):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        (aux,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux, ctx.scale), None


class AuxLossScale:
    """The gradient each micro-batch's aux loss receives (1 / micro-batches: the step's loss is the mean)."""

    def __init__(self, value: float = 1.0):
        self.value = value


def apply_aux_loss_grads(model: nn.Module, scale: AuxLossScale) -> int:
    """A forward hook on the stage `model`: the sum of the aux losses its modules left in that forward
    (`collect_aux_losses`: per-layer z-losses and the MoE balance loss pooled over the stage's MoE
    layers) gets the gradient `scale.value` in backward. The model code is unchanged; returns the
    number of modules with aux losses (0: no hook)."""
    def hook(mod, args, out):
        if not torch.is_grad_enabled():
            return out
        aux = collect_aux_losses(mod)
        total = sum(aux.values()) if aux else None
        if total is None or not total.requires_grad:
            return out
        return _AddAuxLossGrad.apply(out, total, scale.value)

    n = sum(hasattr(mod, "aux_losses") for mod in model.modules())
    if n:
        model.register_forward_hook(hook)
    return n


def apply_stage_boundaries(stage_model: nn.Module, tp_mesh) -> None:
    """Under tensor + sequence parallelism, send the residual stream between stages as plain local
    sequence shards [B, T/tp, C] (what P2P sends) and re-wrap it as a `Shard(1)` DTensor on arrival."""
    if getattr(stage_model, "tok_embeddings", None) is None or getattr(stage_model.tok_embeddings, "head_only", False):
        def to_dtensor(mod, args):
            x = args[0]
            if isinstance(x, DTensor):
                return None
            return (DTensor.from_local(x, tp_mesh, [Shard(1)], run_check=False),) + tuple(args[1:])
        # Before the tensor-parallel input check, which reads the global sequence length.
        stage_model.register_forward_pre_hook(to_dtensor, prepend=True)
    if getattr(stage_model, "norm", None) is None:
        def to_local(mod, args, out):
            if isinstance(out, DTensor):
                if tuple(out.placements) != (Shard(1),):
                    out = out.redistribute(placements=[Shard(1)])
                return out.to_local()
            return out
        stage_model.register_forward_hook(to_local)


def tied_embedding_group(mesh, n_stages: int, pp: int):
    """Process group of this rank's first- and last-stage peers (same dp/tp coordinates), or None.

    Every rank takes part in creating every group (`new_group` is collective)."""
    root = mesh.root.mesh  # [pp, dp_rep, ep, tp] of global ranks
    last_rank = (n_stages - 1) % pp
    if last_rank == 0:
        return None
    mine = None
    me = dist.get_rank()
    flat = root.reshape(pp, -1)
    for col in range(flat.shape[1]):
        ranks = [int(flat[0, col]), int(flat[last_rank, col])]
        group = dist.new_group(ranks)
        if me in ranks:
            mine = group
    return mine


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def sum_tied_grads(weights: list[nn.Parameter], group) -> None:
    """Sum the gradients of the embedding's two copies (first and last stage) over `group`."""
    for w in weights:
        if w.grad is not None:
            dist.all_reduce(_local(w.grad), group=group)


@torch.no_grad()
def average_grads(params: list[nn.Parameter], group, size: int) -> None:
    """Plain data parallelism across stage replicas: average every gradient over `group` (dp ranks)."""
    for p in params:
        if p.grad is not None:
            g = _local(p.grad)
            dist.all_reduce(g, group=group)
            g /= size


def build_pipeline_schedule(name: str, stages: list, n_microbatches: int, loss_fn):
    """torch.distributed.pipelining's schedule for `name` over this rank's `stages` (PipelineStage).

    `loss_fn(output, target)` is applied per micro-batch on the last stage; gradients are not
    rescaled by the schedule (scale_grads=False): the loss function divides by the micro-batches."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    if name == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if len(stages) != 1:
        raise LayoutError(f"parallel.pp_schedule={name} runs one stage per rank, got {len(stages)}")
    cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}.get(name)
    if cls is None:
        raise LayoutError(f"parallel.pp_schedule={name!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def send_activation(x: torch.Tensor, group, dst: int) -> None:
    """Forward-only P2P to pipeline rank `dst`: a small header (shape, dtype), then the tensor."""
    header = torch.zeros(6, dtype=torch.int64, device=x.device)
    header[0] = x.dim()
    header[1:1 + x.dim()] = torch.tensor(x.shape, dtype=torch.int64)
    header[5] = _DTYPES.index(x.dtype)
    peer = dist.get_global_rank(group, dst)
    dist.send(header, dst=peer, group=group)
    dist.send(x.contiguous(), dst=peer, group=group)


def recv_activation(group, src: int, device: torch.device) -> torch.Tensor:
    header = torch.zeros(6, dtype=torch.int64, device=device)
    peer = dist.get_global_rank(group, src)
    dist.recv(header, src=peer, group=group)
    shape = header[1:1 + int(header[0])].tolist()
    x = torch.empty(shape, dtype=_DTYPES[int(header[5])], device=device)
    dist.recv(x, src=peer, group=group)
    return x
