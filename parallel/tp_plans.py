"""Per-family tensor-parallel plans: {module name: ParallelStyle}, applied by `parallelize_module`.

Layout vocabulary (Megatron-LM, Korthikanti et al. 2022 for sequence parallelism): the residual
stream is a DTensor placed `seq` (Shard(1), the sequence, with sequence parallelism; Replicate
without). A norm runs on its sequence shard; the mixer or MLP after it all-gathers the sequence,
runs column-parallel (heads, channels, hidden units) and row-parallel back, and its output is
reduce-scattered onto the sequence again. Embeddings and the LM head are vocab-parallel: the
logits stay sharded on the vocabulary (Shard(-1)) for `tp_cross_entropy`.

Family-specific choices (docs/design.md, "Tensor and sequence parallelism"):
- Titans: the memory's heads are sharded; each rank holds its heads' memory weights and updates
  them (and their momentum) with no communication. MAG/MAC combine attention and memory outputs
  non-linearly, so those outputs are all-reduced (Replicate) before the gate; the residual add
  then slices them onto the sequence shard.
- TTT: the whole TTT layer is one head-parallel region; its full-width output LayerNorm
  all-gathers the heads and computes replicated (exact, and outside the inner update).
- Jamba: Mamba channels (d_inner) are sharded; x_proj is row-parallel (its Δ/B/C are all-reduced,
  small: dt_rank + 2N per token) and Δ/B/C enter the channel shards through Megatron's "f".
  MoE experts stay replicated (expert parallelism is separate): the MoE runs on the gathered
  sequence so its auxiliary losses are the single-process ones.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Partial, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)
from torch.distributed.tensor.placement_types import _StridedShard

from titanforge.parallel.tp_styles import LocalRegion, PlaceParams, ReplicateParams

Plan = dict[str, ParallelStyle]


def _norm(sp: bool) -> ParallelStyle:
    return SequenceParallel() if sp else ReplicateParams()


def embedding_plan(seq: Placement) -> Plan:
    # Vocab-parallel embedding: each rank looks up its vocabulary rows, the partial sums are
    # reduce-scattered onto the sequence (or all-reduced without sequence parallelism; the local
    # output is then re-wrapped by `apply_tensor_parallel`, because DTensor cannot turn the
    # residual's Partial gradient into the embedding's masked-Partial one).
    return {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq,
                                              use_local_output=seq == Replicate())}


def head_plan(model: nn.Module, sp: bool) -> Plan:
    plan = {"norm": _norm(sp)}
    if getattr(model, "output", None) is not None:
        # Only its weight's layout matters (Shard(0), the vocabulary): the model multiplies by it.
        plan["output"] = ColwiseParallel()
    return plan


def swiglu_plan(prefix: str, seq: Placement) -> Plan:
    return {prefix: PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w3": ColwiseParallel(),
            f"{prefix}.w2": RowwiseParallel(output_layouts=seq, use_local_output=False)}


def attention_plan(prefix: str, seq: Placement, n_args: int) -> Plan:
    """models.common.Attention: heads column-parallel, wo row-parallel. n_args: positional inputs."""
    layouts = (seq,) + (None,) * (n_args - 1)
    return {prefix: PrepareModuleInput(input_layouts=layouts, desired_input_layouts=(Replicate(),) + layouts[1:]),
            **{f"{prefix}.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")},
            f"{prefix}.wo": RowwiseParallel(output_layouts=seq, use_local_output=False)}


def llama_plan(model: nn.Module, sp: bool) -> Plan:
    seq = Shard(1) if sp else Replicate()
    plan = embedding_plan(seq)
    for i in model.layers:
        p = f"layers.{i}"
        plan.update({f"{p}.attention_norm": _norm(sp), f"{p}.ffn_norm": _norm(sp)})
        plan.update(attention_plan(f"{p}.attention", seq, n_args=2))
        plan.update(swiglu_plan(f"{p}.feed_forward", seq))
    plan.update(head_plan(model, sp))
    return plan


def titans_plan(model: nn.Module, sp: bool) -> tuple[Plan, list[str]]:
    """Plan, and the norms whose outputs are gathered to Replicate (the mixers read all of it)."""
    seq = Shard(1) if sp else Replicate()
    plan, gathered = embedding_plan(seq), []
    for i, block in model.layers.items():
        p = f"layers.{i}"
        m = f"{p}.memory"
        plan[f"{p}.memory_norm"] = _norm(sp)
        gathered.append(f"{p}.memory_norm")
        column = ("wq", "wk", "wv", "w_gate", "w_theta", "w_eta", "w_alpha")
        plan.update({f"{m}.{w}": ColwiseParallel() for w in column})
        plan[f"{m}.wo"] = RowwiseParallel(output_layouts=Replicate(), use_local_output=False)
        for c in ("conv_q", "conv_k", "conv_v"):
            plan[f"{m}.{c}"] = LocalRegion({"weight": Shard(0)})
        # Each rank holds and updates only its heads' memory (and so its heads' momentum).
        plan[f"{m}.memory"] = LocalRegion({str(j): Shard(0) for j in range(len(block.memory.memory))})
        # One gain shared by every head: each rank's gradient covers its heads only, so it is summed.
        plan[f"{m}.out_norm"] = LocalRegion({"weight": (Replicate(), Partial())})
        if block.attention is not None:
            a = f"{p}.attention"
            # Persistent tokens go through the column-parallel wk/wv as a Replicate DTensor.
            plan[a] = PlaceParams({"persistent": Replicate()})
            plan.update({f"{a}.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")})
            plan[f"{a}.wo"] = RowwiseParallel(output_layouts=Replicate(), use_local_output=False)
        if block.variant == "mag":
            # MAG's gate norms and projection read the replicated branch outputs: replicated compute.
            gate = ("gate_norm_attention", "gate_norm_memory", "gate_proj")
            plan.update({f"{p}.{n}": ReplicateParams() for n in gate})
        if block.attention_norm is not None:
            plan[f"{p}.attention_norm"] = _norm(sp)
            gathered.append(f"{p}.attention_norm")
        plan[f"{p}.ffn_norm"] = _norm(sp)
        plan.update(swiglu_plan(f"{p}.feed_forward", seq))
    plan.update(head_plan(model, sp))
    return plan, gathered


def ttt_plan(model: nn.Module, sp: bool) -> tuple[Plan, list[str]]:
    seq = Shard(1) if sp else Replicate()
    plan, gathered = embedding_plan(seq), []
    for i, block in model.layers.items():
        p = f"layers.{i}"
        if block.conv is not None:
            plan[f"{p}.conv_norm"] = _norm(sp)
            gathered.append(f"{p}.conv_norm")
            # Depthwise over channels: each rank convolves its channel slice of the whole sequence.
            plan[f"{p}.conv"] = LocalRegion({"conv.weight": Shard(0), "conv.bias": Shard(0)},
                                            input_layout=Replicate(), compute_layout=Shard(2),
                                            input_grad=Shard(2), output_layout=Shard(2), desired_output_layout=seq)
        plan[f"{p}.seq_norm"] = _norm(sp)
        gathered.append(f"{p}.seq_norm")
        layer = block.ttt
        params = {name: Shard(0) for name, _ in layer.named_parameters(recurse=False)}
        params["learnable_token_idx"] = (Replicate(), Partial())
        for lin in ("q_proj", "k_proj", "v_proj", "g_proj"):
            if getattr(layer, lin) is not None:
                params[f"{lin}.weight"] = Shard(0)
        params["o_proj.weight"] = Shard(1)
        for conv in ("conv_q", "conv_k"):
            if getattr(layer, conv) is not None:
                params.update({f"{conv}.conv.weight": Shard(0), f"{conv}.conv.bias": Shard(0)})
        plan[f"{p}.ttt"] = LocalRegion(params, input_layout=Replicate(), output_layout=Partial(),
                                       desired_output_layout=seq)
        # The output LayerNorm spans all heads: gather them, normalise (replicated), keep our slice.
        plan[f"{p}.ttt.post_norm"] = LocalRegion({"weight": Replicate(), "bias": Replicate()},
                                                 input_layout=Shard(2), input_grad=Replicate(),
                                                 output_layout=Replicate(), desired_output_layout=Shard(2),
                                                 use_local_output=True)
        plan[f"{p}.ffn_norm"] = _norm(sp)
        plan.update(swiglu_plan(f"{p}.feed_forward", seq))
    plan.update(head_plan(model, sp))
    return plan, gathered


def mamba_plan(prefix: str, mixer: nn.Module, seq: Placement) -> Plan:
    if mixer.in_proj.bias is not None or mixer.out_proj.bias is not None:
        raise ValueError("tensor parallelism of MambaMixer supports proj_bias=False only (Jamba's default)")
    # in_proj's rows are [x | z]; each rank takes its channel block of both halves.
    params = {"in_proj.weight": _StridedShard(0, split_factor=2), "conv1d.weight": Shard(0),
              "conv1d.bias": Shard(0), "x_proj.weight": Shard(1), "dt_proj.weight": Shard(0),
              "dt_proj.bias": Shard(0), "A_log": Shard(0), "D": Shard(0), "out_proj.weight": Shard(1),
              "dt_layernorm.weight": Replicate(), "b_layernorm.weight": Replicate(),
              "c_layernorm.weight": Replicate()}
    plan = {prefix: LocalRegion(params, input_layout=seq, output_layout=Partial(), desired_output_layout=seq),
            # Δ/B/C projections are row-parallel over channels: all-reduce ("g").
            f"{prefix}.x_proj": LocalRegion(output_layout=Partial(), desired_output_layout=Replicate(),
                                            use_local_output=True)}
    for norm in ("dt_layernorm", "b_layernorm", "c_layernorm"):
        # Replicated Δ/B/C feed every rank's channels: gradients are summed ("f").
        plan[f"{prefix}.{norm}"] = LocalRegion(output_layout=Replicate(), use_local_output=True,
                                               output_grad=Partial())
    return plan


def jamba_plan(model: nn.Module, sp: bool) -> Plan:
    from titanforge.models.common import Attention
    from titanforge.models.common.mamba import MambaMixer
    from titanforge.models.common.moe import MoE

    seq = Shard(1) if sp else Replicate()
    plan = embedding_plan(seq)
    for i, block in model.layers.items():
        p = f"layers.{i}"
        plan[f"{p}.input_layernorm"] = _norm(sp)
        if isinstance(block.mixer, Attention):
            plan.update(attention_plan(f"{p}.mixer", seq, n_args=1))
        elif isinstance(block.mixer, MambaMixer):
            plan.update(mamba_plan(f"{p}.mixer", block.mixer, seq))
        else:
            raise ValueError(f"layer {i}: tensor parallelism has no plan for {type(block.mixer).__name__}; "
                             f"use Mamba-1 (M) or attention (A) layers in model.jamba.layer_pattern")
        ffn = block.feed_forward
        if ffn is None:
            continue
        plan[f"{p}.pre_ff_layernorm"] = _norm(sp)
        if isinstance(ffn, MoE):
            # Experts replicated; the MoE sees the whole sequence so routing statistics are exact.
            plan[f"{p}.feed_forward"] = LocalRegion({n: Replicate() for n, _ in ffn.named_parameters()},
                                                    input_layout=seq, input_grad=Replicate(),
                                                    output_layout=Replicate(), desired_output_layout=seq)
        else:
            plan.update(swiglu_plan(f"{p}.feed_forward", seq))
    plan.update(head_plan(model, sp))
    return plan
