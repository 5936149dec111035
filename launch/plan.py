"""`titanforge plan`: what a config's model needs per layout, counted on the meta device (no memory).

`param_counts` (total, active per token) is also what the trainer prints at start.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from titanforge.models.registry import build_model


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (`...feed_forward.experts.w1`): each token uses top_k of n_experts."""
    return ".experts." in name


def param_counts(model_cfg, model: nn.Module | None = None) -> tuple[int, int]:
    """(total, active per token) parameters; tied weights counted once. Built on meta unless given."""
    model = model if model is not None else build_model(model_cfg, device="meta")
    total = expert = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if is_expert_param(name):
            expert += p.numel()
    active = total
    if expert:
        moe = model_cfg.jamba.moe
        active = total - expert + expert * moe.top_k // moe.n_experts
    return total, active


# ---------------------------------------------------------------------------------------------
# The planner: per-layout memory per rank and a step-time estimate.
#
# Memory per rank (bytes), float32 master weights and AdamW (two float32 states), as the trainer:
#   parameters + gradients + optimizer state: this rank's share of its pipeline stage, divided by
#     tp (dense weights; experts are replicated over tp and split over ep), and by dp where the
#     data-parallel engine shards it (FSDP2: all three; ZeRO-1: optimizer; ZeRO-2: + gradients;
#     DDP: nothing, plus one gradient-sized bucket copy);
#   FSDP2 working set: the largest block gathered twice (current + prefetched) and its full
#     gradient once; under pp with several micro-batches the whole stage's gathered parameters and
#     unsharded gradients (torch's pipeline stages skip FSDP's reshard and reduce-scatter until the
#     last micro-batch), the peak then following the first backward;
#   activations: what autograd keeps per token per block, estimated from the block's modules
#     (inputs and outputs of every Linear, the family's recurrent states: Titans' per-chunk memory
#     weights, TTT's per-mini-batch inner weights, Mamba's scan states), times the micro-batch's
#     tokens, the stage's blocks and, under 1F1B, the pp micro-batches in flight; not divided by
#     tp (measured, see estimate()); with activation checkpointing one block's worth plus every block's input;
#   logits: three float32 copies of [micro, T, V];
#   a fixed runtime overhead (--overhead-gb: CUDA context and allocator slack on a GPU).
# Step time: 6N-style FLOPs (the model's own flops_per_token) at --mfu of the device peak, plus
#   communication at the interconnect's bandwidth (FSDP: gather params twice + reduce-scatter
#   grads; DDP/ZeRO: all-reduce grads; TP: 4 activation collectives per block forward+backward),
#   times the pipeline bubble 1 + (pp - 1) / micro-batches.
# ---------------------------------------------------------------------------------------------

F32 = 4


@dataclasses.dataclass
class Layout:
    dp: int
    tp: int
    pp: int
    ep: int
    engine: str  # fsdp | ddp | zero1 | zero2 | zero3
    ac: bool

    def name(self) -> str:
        parts = [f"dp{self.dp}"] + [f"{k}{v}" for k, v in (("tp", self.tp), ("pp", self.pp), ("ep", self.ep)) if v > 1]
        return "x".join(parts) + f" {self.engine}" + (" +ac" if self.ac else "")


@dataclasses.dataclass
class Estimate:
    layout: Layout
    params: float
    grads: float
    optim: float
    working: float
    activations: float
    logits: float
    overhead: float
    step_s: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optim + self.working + self.activations + self.logits + self.overhead


@dataclasses.dataclass
class ModelStats:
    total: int
    expert: int
    embed: int  # embedding + head (+ final norm): the parts outside the blocks
    blocks: list  # per block: (dense params, expert params, activation bytes per token)
    flops_per_token: float
    first: int = 0  # outside the blocks on the first pipeline stage (embedding)
    last: int = 0  # on the last stage (final norm, head; the embedding again when tied)


def _block_activation_per_token(block: nn.Module, cfg) -> float:
    """Bytes autograd keeps per token for one block (float32), estimated from its modules."""
    elems = 0.0
    # A Linear keeps its input (once for siblings reading the same tensor: q/k/v, w1/w3) and its
    # output (read by the next op: attention, the gate's product, the scan); an RMSNorm its input.
    inputs = {}
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear):
            inputs[(name.rpartition(".")[0], m.in_features)] = m.in_features
            elems += m.out_features
        elif type(m).__name__ == "RMSNorm":
            elems += m.weight.shape[0]
    elems += sum(inputs.values())
    names = {n.rsplit(".", 1)[-1]: p for n, p in block.named_parameters()}
    for name, p in block.named_parameters():
        if ".experts." in name and p.ndim == 3:
            # Each routed token keeps the inputs/outputs of top_k experts' three matmuls.
            moe = cfg.jamba.moe
            if name.endswith("w1"):
                elems += moe.top_k * (2 * p.shape[1] + 3 * p.shape[2])
    fam = cfg.family
    if fam == "titans":
        mem = sum(p.numel() for n, p in block.named_parameters() if ".memory." in n and p.ndim >= 2)
        elems += 3 * mem / max(cfg.titans.chunk_size, 1)  # weights, momentum, grads per chunk
    elif fam == "ttt":
        inner = sum(p.numel() for n, p in block.named_parameters() if n.split(".")[-1] in ("W1", "W2"))
        elems += 2 * inner / max(cfg.ttt.mini_batch_size, 1)
    elif fam == "jamba" and "A_log" in names:
        d_inner, d_state = names["A_log"].shape
        elems += 2 * d_inner * d_state / max(cfg.jamba.chunk_size, 1)
    return elems * F32


def model_stats(model_cfg, seq_len: int) -> ModelStats:
    model = build_model(model_cfg, device="meta")
    total, _ = param_counts(model_cfg, model)
    expert = sum(p.numel() for n, p in model.named_parameters() if is_expert_param(n))
    blocks = []
    for block in model.layers.values():
        dense = sum(p.numel() for n, p in block.named_parameters() if ".experts." not in n)
        exp = sum(p.numel() for n, p in block.named_parameters() if ".experts." in n)
        blocks.append((dense, exp, _block_activation_per_token(block, model_cfg)))
    embed = total - sum(d + e for d, e, _ in blocks)
    first = model.tok_embeddings.weight.numel()
    last = embed - first + (first if model.output is None else 0)  # a tied head holds its own copy
    return ModelStats(total, expert, embed, blocks, model.flops_per_token(seq_len), first, last)


def estimate(stats: ModelStats, model_cfg, lay: Layout, *, micro: int, seq_len: int, global_batch: int,
             overhead_gb: float, peak_tflops: float, mfu: float, bw_gbs: float) -> Estimate:
    from titanforge.parallel.pipeline import split_layers

    n_layers = len(stats.blocks)
    stages = split_layers(n_layers, lay.pp)
    tokens = micro * seq_len
    n_micro = max(global_batch // (micro * lay.dp), 1)
    dp_rep = lay.dp // lay.ep
    e = lay.engine
    # Activations and logits are not divided by tp: measured (tests/parallel/test_plan.py, CPU
    # gloo), Llama at tp=2 x dp=2 peaks 6% above dp=4, though sequence parallelism and the
    # vocabulary-sharded loss should save about a third (which tensors the DTensor path keeps
    # instead is not traced yet); dividing by tp underestimated that peak by 26%.

    def stage_estimate(s: int):
        idx = stages[s]
        extra = stats.embed if lay.pp == 1 else (stats.first if s == 0 else 0) + (stats.last if s == lay.pp - 1 else 0)
        dense = sum(stats.blocks[i][0] for i in idx) + extra
        expert = sum(stats.blocks[i][1] for i in idx)
        local = dense / lay.tp + expert / lay.ep
        if e == "fsdp":
            shard = dense / lay.tp / lay.dp + expert / lay.ep / dp_rep
            params, grads, optim = shard, shard, 2 * shard
            working = 3 * max(stats.blocks[i][0] / lay.tp + stats.blocks[i][1] / lay.ep for i in idx)
            if lay.pp > 1 and n_micro > 1:
                # torch's pipeline stages keep FSDP's parameters gathered and accumulate unsharded
                # gradients until the last micro-batch's backward (which reduce-scatters them).
                grads, working = 0.0, 2 * local
        else:
            params = local / lay.dp if e == "zero3" else local
            grads = local / lay.dp if e in ("zero2", "zero3") else local
            optim = 2 * local / lay.dp if e.startswith("zero") else 2 * local
            working = local if e == "ddp" else 0.0  # DDP's gradient buckets
        # 1F1B: stage s keeps the activations of pp - s micro-batches before its first backward.
        in_flight = min(lay.pp - s, n_micro)
        if e == "fsdp" and lay.pp > 1 and n_micro > 1:
            # The peak is then after the first backward: the other micro-batches' activations.
            in_flight = max(in_flight - 1, 1)
        per_block = [stats.blocks[i][2] for i in idx]
        if lay.ac:
            act = tokens * (len(idx) * model_cfg.d_model * F32 + max(per_block))
        else:
            act = tokens * sum(per_block)
        logits = 3 * tokens * model_cfg.vocab_size * F32 if s == lay.pp - 1 else 0.0
        return params * F32, grads * F32, optim * F32, working * F32, act * in_flight, logits, local

    parts = max((stage_estimate(s) for s in range(lay.pp)), key=lambda r: sum(r[:6]))
    params, grads, optim, working, act, logits, local = parts
    # Step time.
    world = lay.dp * lay.tp * lay.pp
    flops = stats.flops_per_token * global_batch * seq_len * (4 / 3 if lay.ac else 1)
    compute = flops / (world * peak_tflops * 1e12 * mfu)
    bw = bw_gbs * 1e9
    if lay.dp > 1:
        ring = (lay.dp - 1) / lay.dp
        comm_bytes = (3 if e in ("fsdp", "zero3") else 2) * local * F32 * ring
        if e == "fsdp":
            comm_bytes *= n_micro if n_micro > 1 else 1
    else:
        comm_bytes = 0.0
    if lay.tp > 1:
        comm_bytes += 4 * n_layers / lay.pp * global_batch / lay.dp * seq_len * model_cfg.d_model * 2 * (lay.tp - 1) / lay.tp
    bubble = 1 + (lay.pp - 1) / n_micro
    step = (compute + comm_bytes / bw) * bubble
    return Estimate(lay, params, grads, optim, working, act, logits, overhead_gb * 2**30, step)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(model_cfg, gpus: int, gpus_per_node: int, micro: int, global_batch: int) -> list[Layout]:
    from titanforge.parallel.tensor_parallel import check_tp

    moe = model_cfg.family == "jamba" and "E" in model_cfg.jamba.layer_pattern
    out = []
    for tp in _divisors(min(gpus, gpus_per_node)):
        if check_tp(model_cfg, tp):
            continue
        for pp in _divisors(gpus // tp):
            if pp > model_cfg.n_layers:
                continue
            dp = gpus // (tp * pp)
            if global_batch % (micro * dp) or (pp > 1 and global_batch // (micro * dp) < pp):
                continue
            eps = [ep for ep in _divisors(dp) if model_cfg.jamba.moe.n_experts % ep == 0] if moe else [1]
            for ep in eps:
                if ep > 1 and (tp > 1 or pp > 1):
                    continue  # not composed in the trainer (docs/design.md)
                engines = ["fsdp", "ddp"] if dp > 1 else ["ddp"]
                if dp > 1 and tp == pp == ep == 1:
                    engines += ["zero1", "zero2", "zero3"]
                for engine in engines:
                    for ac in (False, True):
                        out.append(Layout(dp, tp, pp, ep, engine, ac))
    return out


def plan(model_cfg, *, gpus: int, gpu_mem_gb: float, nodes: int = 1, micro: int = 1, seq_len: int | None = None,
         global_batch: int = 8, overhead_gb: float = 1.0, peak_tflops: float = 989.0, mfu: float = 0.4,
         intra_gbs: float = 450.0, inter_gbs: float = 50.0) -> list[tuple[Estimate, bool]]:
    """Every feasible layout's estimate and whether it fits, best first (fitting, then fastest)."""
    seq_len = seq_len or model_cfg.max_seq_len
    stats = model_stats(model_cfg, seq_len)
    per_node = max(gpus // nodes, 1)
    rows = []
    for lay in layouts(model_cfg, gpus, per_node, micro, global_batch):
        # Traffic that crosses nodes (dp spans them once tp x pp fills a node) runs at inter-node speed.
        bw = inter_gbs if nodes > 1 and lay.tp * lay.pp < gpus else intra_gbs
        est = estimate(stats, model_cfg, lay, micro=micro, seq_len=seq_len, global_batch=global_batch,
                       overhead_gb=overhead_gb, peak_tflops=peak_tflops, mfu=mfu, bw_gbs=bw)
        fits = est.total <= gpu_mem_gb * 2**30
        if lay.engine.startswith("zero"):
            # ZeRO starts from the whole float32 model on every rank (trainer/deepspeed_step.py):
            # it fits only if that does, whatever its partitions would need afterwards.
            fits = fits and stats.total * F32 + overhead_gb * 2**30 <= gpu_mem_gb * 2**30
        rows.append((est, fits))
    rows.sort(key=lambda r: (not r[1], r[0].step_s if r[1] else r[0].total))
    return rows


def format_plan(rows, model_cfg, limit: int = 12) -> str:
    total, active = param_counts(model_cfg)
    gib = 2**30
    lines = [f"{model_cfg.family}: {total / 1e6:,.1f}M parameters" + (f" ({active / 1e6:,.1f}M active)" if active != total else ""),
             f"{'layout':<28}{'params':>8}{'grads':>8}{'optim':>8}{'work':>8}{'acts':>8}{'logits':>8}{'total':>9}  fits  step(s)"]
    for est, fits in rows[:limit]:
        lines.append(f"{est.layout.name():<28}" + "".join(f"{v / gib:8.2f}" for v in (
            est.params, est.grads, est.optim, est.working, est.activations, est.logits)) +
            f"{est.total / gib:9.2f}  {'yes ' if fits else 'no  '}  {est.step_s:.3f}")
    lines.append("(GiB per rank; step time from FLOPs at the given MFU and peak plus communication; estimates)")
    if any(est.layout.engine.startswith("zero") for est, _ in rows[:limit]):
        lines.append("(zero1-3 start from the whole float32 model on every rank: they fit only if it does; FSDP2 "
                     "starts sharded)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse
    import sys

    from titanforge.launch.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="titanforge plan", description="Memory per rank and step time per layout.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs")
    p.add_argument("--gpu-mem", type=float, required=True, help="GiB per GPU")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None, help="default: model.max_seq_len")
    p.add_argument("--overhead-gb", type=float, default=1.0, help="fixed runtime memory per rank (CUDA context)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU (H100 bf16 dense: 989)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_intermixed_args(argv)
    if args.gpus < 1 or args.nodes < 1 or args.gpus % args.nodes:
        print(f"titanforge plan: --gpus {args.gpus} must be a positive multiple of --nodes {args.nodes}", file=sys.stderr)
        return 2
    try:
        job = load_config(args.config, [*args.overrides, "init.from=''"])
    except ConfigError as e:
        print(f"titanforge plan: {e}", file=sys.stderr)
        return 2
    rows = plan(job.model, gpus=args.gpus, gpu_mem_gb=args.gpu_mem, nodes=args.nodes,
                micro=job.train.micro_batch_size, seq_len=args.seq_len, global_batch=job.train.global_batch_size,
                overhead_gb=args.overhead_gb, peak_tflops=args.peak_tflops, mfu=args.mfu)
    if not rows:
        print("titanforge plan: no layout of these degrees fits the model's shapes and the batch; change --gpus "
              "or train.global_batch_size", file=sys.stderr)
        return 2
    print(format_plan(rows, job.model, args.top))
    return 0
