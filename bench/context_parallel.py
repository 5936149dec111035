"""Context parallelism: memory per rank, step time, the longest sequence under a memory cap, and
the bytes each layer sends, at cp = 1, 2, 4 for Titans MAC and Jamba.

    .venv/bin/python -P bench/context_parallel.py                   # CPU, gloo: results/context_parallel.json
    .venv/bin/python -P bench/context_parallel.py --device cuda     # GPUs, NCCL: results/context_parallel_cuda.json

One process group per cp degree (spawned processes, one per rank). A step is forward + backward of
one sample through the trainer's `parallelize` (the context-parallel forwards of parallel/context.py
and DDP over the cp ranks), float32, B = 1; the cp=1 run is the single-process reference measured
in the same invocation.
- Memory per rank: the activations a step keeps for backward (bytes of the distinct storages the
  autograd saved-tensor hooks see, parameters excluded; max over ranks), the part context
  parallelism divides; on GPU also the peak of torch.cuda.max_memory_allocated over the step.
  (The CPU's resident-set peak shows nothing after the first step: the allocator keeps and reuses
  the pages.)
- Longest sequence under the cap: T doubles from --min-seq until a step's activation memory on
  some rank passes --cap-mib (or --max-seq is reached); the target is growth about linear in cp.
- Bytes per layer per step: every rank's payload bytes (ContextGroup.bytes_sent, forward and
  backward, headers excluded) summed, against the formula of docs/design.md ("Context
  parallelism"), evaluated here from the model's shapes.
- Split balance (`cp_split` in the results): for --balance-models (default Llama, attention only)
  at each cp > 1, full attention's zig-zag against its contiguous split: every rank's step time,
  its blockwise-attention forward time, and the score elements it computes per step (the work
  count; zig-zag: equal on every rank, contiguous: r + 1 to 1). `--balance-only` runs just this
  and merges it into the existing results file, keeping the other fields.
On the 2-core CPU host the ranks share two cores, so cp > 2 cannot be faster there; the memory
figures, bytes and work counts are what this benchmark is for on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def model_config(name: str, seq_len: int):
    from titanforge.models.config import ModelConfig

    common = dict(vocab_size=256, d_model=64, n_heads=4, max_seq_len=seq_len, ffn_hidden=128)
    if name == "titans-mac":
        cfg = ModelConfig(family="titans", n_layers=2, **common)
        cfg.titans.variant, cfg.titans.segment_len, cfg.titans.chunk_size = "mac", 64, 16
        return cfg
    if name == "llama":
        return ModelConfig(family="llama", n_layers=4, n_kv_heads=2, **common)
    cfg = ModelConfig(family="jamba", n_layers=4, n_kv_heads=2, **common)
    cfg.jamba.layer_pattern, cfg.jamba.d_state = "MD AD", 16
    return cfg


def formula_bytes(cfg, seq_len: int, cp: int, elt: int = 4, split: str = "zigzag") -> dict:
    """Bytes all ranks send per step, per layer kind (docs/design.md): a state hand-off sends the
    state S forward and its gradient back across each of the cp-1 boundaries, 2 (cp-1) S; full
    attention all-gathers K and V ((cp-1) KV forward, KV the bytes of the whole sequence's keys and
    values) and all-reduces their gradient (ring: 2 (cp-1) KV), 3 (cp-1) KV; the zig-zag split
    adds the queries' exchange."""
    B, C, H = 1, cfg.d_model, cfg.n_heads
    D = C // H
    if cp == 1:
        return {}
    if cfg.family == "titans":
        t = cfg.titans
        widths = [D] + [D * t.memory_expansion] * (t.memory_depth - 1) + [D]
        weights = sum(B * H * i * o for i, o in zip(widths[:-1], widths[1:]))
        conv = B * (t.conv_kernel - 1) * (3 * C + C)  # y's q/k/v conv cache and the queries' cache
        S = (2 * weights + conv) * elt  # weights and momentum
        return {"mac_layer": 2 * (cp - 1) * S, "state_bytes": S}
    G = cfg.kv_heads
    KV = B * seq_len * 2 * G * D * elt
    attention = 3 * (cp - 1) * KV
    if split == "zigzag":
        # The queries of the half-pieces whose zig-zag owner is another rank, their outputs, and
        # both gradients: 4 M c B H D, c = T / 2cp tokens a half.
        from titanforge.parallel.context import _contiguous_half, _zigzag_half

        moved = sum(_contiguous_half(h, cp)[0] != _zigzag_half(h, cp)[0] for h in range(2 * cp))
        attention += 4 * moved * (seq_len // (2 * cp)) * B * H * D * elt
    if cfg.family == "llama":
        return {"attention_layer": attention, "kv_bytes": KV}
    j = cfg.jamba
    inner = j.expand * C
    S = (B * inner * (j.d_conv - 1) + B * inner * j.d_state) * elt
    return {"mamba_layer": 2 * (cp - 1) * S, "attention_layer": attention, "state_bytes": S, "kv_bytes": KV}


def _peak_reset(device):
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_read(device, base):
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class _AttentionTimer:
    """Wall time of this rank's blockwise-attention forwards (parallel/context.py calls the module's
    `offset_causal_attention`, which this wraps for the benchmark's lifetime)."""

    def __init__(self, device):
        import titanforge.parallel.context as context

        self.device, self.seconds, self.inner = device, 0.0, context.offset_causal_attention
        context.offset_causal_attention = self

    def __call__(self, *args, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        return out


def _step_stats(name, seq_len, cp, device, repeats, split="zigzag", timer=None):
    """(activation bytes, peak bytes, median step seconds, payload bytes per step, attention score
    elements per step, attention forward seconds per step) of this rank."""
    import torch.nn.functional as F

    from titanforge.models.registry import build_model
    from titanforge.parallel import ParallelDims, build_mesh, parallelize
    from titanforge.parallel.config import ParallelConfig
    from titanforge.parallel.context import context_group, shard_sequence

    cfg = model_config(name, seq_len)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    pcfg = ParallelConfig(cp=cp, cp_split=split)
    dims = ParallelDims.from_config(pcfg, dist.get_world_size())
    mesh = build_mesh(dims, device.type)
    model = parallelize(model, cfg.family, dims, mesh, pcfg, device)
    raw = model.module if hasattr(model, "module") else model
    cg = context_group(raw)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(1))
    piece = shard_sequence(tokens, dist.get_rank(), cp).to(device)

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step():
        saved = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                saved[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(piece[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), piece[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        return sum(saved.values())

    step()  # warm-up (kernel builds, allocator)
    times, peak, act = [], 0, 0
    sent0 = cg.bytes_sent if cg is not None else 0
    scores0 = cg.attention_scores if cg is not None else 0
    attn0 = timer.seconds if timer is not None else 0.0
    for _ in range(repeats):
        dist.barrier()
        base = _peak_reset(device)
        t0 = time.perf_counter()
        act = max(act, step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = max(peak, _peak_read(device, base))
    sent = ((cg.bytes_sent if cg is not None else 0) - sent0) / repeats
    scores = ((cg.attention_scores if cg is not None else 0) - scores0) / repeats
    attn = ((timer.seconds if timer is not None else 0.0) - attn0) / repeats
    del model, raw
    return act, peak, statistics.median(times), sent, scores, attn


def _worker(rank, cp, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=cp,
                            device_id=device if device.type == "cuda" else None)
    res = {"fixed": {}, "longest": {}, "balance": {}}
    timer = _AttentionTimer(device)
    for name in args.models if not args.balance_only else ():
        act, peak, sec, sent, _, _ = _step_stats(name, args.seq_len, cp, device, args.repeats)
        res["fixed"][name] = {"act_bytes": act, "peak_bytes": peak, "step_s": sec, "bytes_sent": sent}
        best, T = None, args.min_seq
        while T <= args.max_seq:
            act, peak, sec, *_ = _step_stats(name, T, cp, device, 1)
            flag = torch.tensor([act > args.cap_mib * 2**20], dtype=torch.int32, device=device)
            dist.all_reduce(flag)
            if flag.item():
                break
            best = {"seq_len": T, "act_bytes": act, "step_s": sec}
            T *= 2
        res["longest"][name] = best
    for name in args.balance_models if cp > 1 else ():
        # Two rounds, the splits alternating, the faster round kept per split: the first model a
        # process runs is slower (allocator, gloo buffers) whichever split it has.
        for _ in range(2):
            for split in ("contiguous", "zigzag"):
                _, _, sec, sent, scores, attn = _step_stats(name, args.balance_seq, cp, device, args.repeats, split,
                                                            timer)
                old = res["balance"].get(f"{name}/{split}")
                if old is None or sec < old["step_s"]:
                    res["balance"][f"{name}/{split}"] = {"step_s": sec, "attention_scores": scores,
                                                         "attention_fwd_s": attn, "bytes_sent": sent}
    gathered = [None] * cp
    dist.all_gather_object(gathered, res)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--cps", default="1,2,4")
    ap.add_argument("--models", default="titans-mac,jamba")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cap-mib", type=float, default=48.0)
    ap.add_argument("--min-seq", type=int, default=512)
    ap.add_argument("--max-seq", type=int, default=8192)
    ap.add_argument("--balance-models", default="llama",
                    help="models whose full-attention split (zigzag vs contiguous) is compared at each cp > 1")
    ap.add_argument("--balance-seq", type=int, default=2048)
    ap.add_argument("--balance-only", action="store_true",
                    help="run only the split comparison and merge it into the existing results file")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible; run on a GPU host or use --device cpu")
    args.models = args.models.split(",")
    args.balance_models = [m for m in args.balance_models.split(",") if m]
    results, balance = {}, {}
    for cp in (int(c) for c in args.cps.split(",")):
        if args.balance_only and cp == 1:
            continue
        if args.device == "cuda" and cp > torch.cuda.device_count():
            print(f"cp={cp}: only {torch.cuda.device_count()} GPUs visible, skipped", flush=True)
            continue
        out = ROOT / "bench" / "results" / f".cp{cp}.tmp.json"
        t0 = time.time()
        mp.spawn(_worker, args=(cp, _free_port(), args, str(out)), nprocs=cp, join=True)
        ranks = json.loads(out.read_text())
        out.unlink()
        entry = {}
        for name in args.balance_models if cp > 1 else ():
            for split in ("zigzag", "contiguous"):
                per = [r["balance"][f"{name}/{split}"] for r in ranks]
                scores = [p["attention_scores"] for p in per]
                balance.setdefault(f"cp{cp}", {})[f"{name}/{split}"] = {
                    "seq_len": args.balance_seq,
                    "step_s_per_rank": [p["step_s"] for p in per],
                    "attention_fwd_s_per_rank": [p["attention_fwd_s"] for p in per],
                    "attention_scores_per_rank": scores,
                    "attention_work_max_over_min": max(scores) / min(scores),
                    "attention_work_max_over_mean": max(scores) / statistics.mean(scores),
                    "bytes_sent_per_step": sum(p["bytes_sent"] for p in per),
                    "bytes_sent_per_step_formula": model_config(name, args.balance_seq).n_layers * formula_bytes(
                        model_config(name, args.balance_seq), args.balance_seq, cp, split=split)["attention_layer"],
                }
        for name in args.models if not args.balance_only else ():
            cfg = model_config(name, args.seq_len)
            fixed = [r["fixed"][name] for r in ranks]
            longest = ranks[0]["longest"][name]
            entry[name] = {
                "seq_len": args.seq_len,
                "activation_mib_per_rank": max(f["act_bytes"] for f in fixed) / 2**20,
                "gpu_peak_mib_per_rank": max(f["peak_bytes"] for f in fixed) / 2**20 if args.device == "cuda" else None,
                "step_s": max(f["step_s"] for f in fixed),
                "bytes_sent_per_step_measured": sum(f["bytes_sent"] for f in fixed),
                "bytes_per_layer_formula": formula_bytes(cfg, args.seq_len, cp),
                "longest_seq_under_cap": longest and longest["seq_len"],
                "activation_mib_at_longest": longest and max(r["longest"][name]["act_bytes"] for r in ranks) / 2**20,
            }
            f = entry[name]["bytes_per_layer_formula"]
            if f:
                specs = (["mac_layer"] * cfg.n_layers if cfg.family == "titans" else
                         ["attention_layer"] * cfg.n_layers if cfg.family == "llama" else
                         [{"M": "mamba_layer", "A": "attention_layer"}[c] for c in cfg.jamba.layer_pattern
                          if c in "MA"] * (cfg.n_layers // 2))
                entry[name]["bytes_sent_per_step_formula"] = sum(f[s] for s in specs)
        results[f"cp{cp}"] = entry
        print(f"cp={cp} ({time.time() - t0:.0f} s): {json.dumps(entry)} {json.dumps(balance.get(f'cp{cp}'))}",
              flush=True)
    from machine_info import cpu_model  # noqa: E402  (bench/ on sys.path when run as a script)

    doc = {"benchmark": "context_parallel", "device": args.device,
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                       "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None},
           "torch": torch.__version__, "config": {k: v for k, v in vars(args).items() if k != "out"},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python -P bench/context_parallel.py " + " ".join(sys.argv[1:]), "results": results}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "context_parallel.json" if args.device == "cpu" else "context_parallel_cuda.json")
    split_doc = {"date": doc["date"], "command": doc["command"], "load_avg_1_5_15": list(os.getloadavg()),
                 "note": "full attention's zig-zag vs contiguous split (parallel.cp_split): per-rank step "
                         "time, blockwise-attention forward time and score elements computed per step"
                         + ("; the 'results' above are an earlier run's, measured with the contiguous split "
                            "(before parallel.cp_split existed)" if args.balance_only else ""),
                 "results": balance}
    if args.balance_only:
        # Keep the earlier run's fields; only the split comparison is new.
        doc = json.loads(out.read_text()) if out.exists() else doc
    doc["cp_split"] = split_doc
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
