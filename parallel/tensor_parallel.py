"""Tensor + sequence parallelism (Megatron-LM style) for every model family, on a 1-D "tp" mesh.

Shoeybi et al. 2019 (tensor parallelism: heads and MLP hidden units split column-then-row, one
all-reduce per block half) and Korthikanti et al. 2022 (sequence parallelism: norms and the
residual stream sharded on the sequence between the parallel regions, all-gather before and
reduce-scatter after each). Built on torch.distributed.tensor: parameters become DTensors placed
on the tp mesh, so optimizers, FSDP2 (applied afterwards on a dp mesh) and DCP see global tensors.
The per-family plans are in `tp_plans.py`, the styles PyTorch lacks in `tp_styles.py`, the
vocab-parallel loss in `tp_loss.py`.

Use:
    model = build_model(cfg); (init or load weights, identical on every tp rank)
    model = apply_tensor_parallel(model, tp_mesh, cfg.family)
    loss = tp_cross_entropy(model(tokens), targets, tp_mesh)

Apply it to a model with materialised weights (identical on the tp ranks, e.g. same seed or
loaded): each parameter is scattered from tp rank 0. The model's `init_weights` is not meant to
run after this (several families initialise with plain-tensor copies).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import parallelize_module

from titanforge.models.config import ModelConfig
from titanforge.parallel import tp_plans
from titanforge.parallel.tp_loss import tp_cross_entropy, vocab_parallel_cross_entropy
from titanforge.parallel.tp_styles import PlaceParams, finalize_grads, redistribute_output, svf_style

__all__ = ["apply_tensor_parallel", "check_tp", "tp_cross_entropy", "vocab_parallel_cross_entropy"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _need(errs: list[str], what: str, value: int, tp: int) -> None:
    if value % tp:
        fits = [d for d in _divisors(value) if d <= 64]
        errs.append(f"{what}={value} is not divisible by parallel.tp={tp}; tp must divide it "
                    f"(tp in {fits}), or make {what} a multiple of {tp}")


def check_tp(cfg: ModelConfig, tp: int) -> list[str]:
    """Problems of running `cfg` with tensor parallelism of degree `tp` (empty when it fits)."""
    if tp < 1:
        return [f"parallel.tp={tp} must be >= 1"]
    if tp == 1:
        return []
    errs: list[str] = []
    _need(errs, "model.vocab_size", cfg.vocab_size, tp)
    _need(errs, "model.n_heads", cfg.n_heads, tp)
    if cfg.family in ("llama", "jamba"):
        _need(errs, "model.n_kv_heads", cfg.kv_heads, tp)
    if cfg.family == "jamba":
        from titanforge.models.common.pattern import parse_layer_pattern
        specs = parse_layer_pattern(cfg.jamba.layer_pattern, cfg.n_layers)
        if any(s.mixer == "mamba2" for s in specs):
            errs.append("model.jamba.layer_pattern has Mamba-2 (S) layers, which tensor parallelism does not "
                        "shard yet; use Mamba-1 (M) layers or parallel.tp=1")
        _need(errs, "Mamba d_inner (model.jamba.expand * model.d_model)", cfg.jamba.expand * cfg.d_model, tp)
        if any(s.ffn == "mlp" for s in specs):
            _need(errs, "model.ffn_dim", cfg.ffn_dim, tp)
    else:
        _need(errs, "model.ffn_dim", cfg.ffn_dim, tp)
    return errs


def _fit_plan_to_stage(model: nn.Module, plan: dict) -> dict:
    """A pipeline stage (parallel/pipeline.py) lacks some modules (set to None): their plan entries are
    skipped. Its copy of a tied embedding, used only by the LM head, gets only the embedding's weight
    placement (vocabulary rows, Shard(0)) and no input/output hooks."""
    out = {}
    for name, style in plan.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        if mod is None:
            continue
        out[name] = PlaceParams({"weight": Shard(0)}) if getattr(mod, "head_only", False) else svf_style(mod, style)
    return out


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, family: str, *, sequence_parallel: bool = True,
                          loss_parallel: bool = True) -> nn.Module:
    """Shard `model` (built by models.registry for `family`) over `tp_mesh` in place; returns it.

    sequence_parallel: norms and the residual stream sharded on the sequence (the sequence length
        must then be divisible by the tp degree).
    loss_parallel: the model returns logits as a DTensor sharded on the vocabulary, for
        `tp_cross_entropy`; otherwise they are gathered into a plain [B, T, V] tensor.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs the 1-D tp mesh, got {tp_mesh.ndim} dims; pass mesh['tp']")
    tp = tp_mesh.size()
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        errs = check_tp(cfg, tp)
        if errs:
            raise ValueError("tensor parallelism does not fit the model:\n  - " + "\n  - ".join(errs))
    gathered: list[str] = []
    if family == "llama":
        plan = tp_plans.llama_plan(model, sequence_parallel)
    elif family == "titans":
        plan, gathered = tp_plans.titans_plan(model, sequence_parallel)
    elif family == "ttt":
        plan, gathered = tp_plans.ttt_plan(model, sequence_parallel)
    elif family == "jamba":
        plan = tp_plans.jamba_plan(model, sequence_parallel)
    else:
        raise ValueError(f"no tensor-parallel plan for family {family!r}; choose llama, titans, ttt or jamba")
    plan = _fit_plan_to_stage(model, plan)
    # Modules that would concatenate their projections' weights into one matmul (Titans) run them
    # as separate linears: each is its own column-parallel module in the plan.
    for module in model.modules():
        if hasattr(module, "fuse_projections"):
            module.fuse_projections = False
    # PyTorch's styles re-create parameters trainable: keep frozen ones (SVF's base weights) frozen.
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    parallelize_module(model, tp_mesh, plan)
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    # Mixers that read the whole sequence (and the LM head) get the gathered norm output.
    for name in gathered + ["norm"]:
        if name in plan:
            redistribute_output(model.get_submodule(name), Replicate())
    if not sequence_parallel and "tok_embeddings" in plan:
        model.tok_embeddings.register_forward_hook(
            lambda mod, args, out: DTensor.from_local(out, tp_mesh, [Replicate()], run_check=False))
    finalize_grads(model)

    def check_input(mod, args):
        T = args[0].shape[1]
        if sequence_parallel and T % tp:
            raise ValueError(f"sequence length {T} is not divisible by parallel.tp={tp} (sequence parallelism "
                             f"shards it); use a multiple of {tp} or sequence_parallel=False")

    def gather_logits(mod, args, out):
        return out.full_tensor() if isinstance(out, DTensor) else out

    model.register_forward_pre_hook(check_input)
    if not loss_parallel:
        model.register_forward_hook(gather_logits)
    return model
