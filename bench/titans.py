"""CPU forward+backward throughput and memory per token of our Titans MAC against titans-pytorch 0.5.5.

Config (both sides): dim 256, depth 4, 4 heads of 64, gated ffn of inner width 682 (titans-pytorch's
GEGLU at ff_mult 4 is int(256 * 4 * 2/3) = 682; ours is SwiGLU with ffn_hidden = 682), memory MLP of
depth 2 and expansion 2 per head, memory chunk 16, segment 64, 4 persistent tokens, vocab 256,
B = 2. titans-pytorch gets no long-term memory tokens and no hyper-connections
(num_residual_streams = 1), so both run the same amount of sequence mixing.
Memory semantics: ours runs its defaults, per-token reads y_t = M_t(q_t) (the dual form) and the
per-token inner-gradient clip at norm 1.0 (model.titans.inner_grad_clip); titans-pytorch gets
max_grad_norm = 1.0 (its soft clamp of each weight's per-token gradient norm), and reads each
chunk's tokens from one set of weights (its retrieve_memories), less work than our per-token read.
`--also-chunk-read` also times ours with memory_read: chunk (the cheaper read).

Speed: each (model, T) is timed alone in a fresh subprocess, under the trainer's CPU settings
(train.keep_freed_memory: glibc keeps freed memory, so steps do not page-fault their activations
in again; train.flush_denormal; huge pages: the glibc tunable `titanforge train` starts with),
`--warmup` steps (default 2: the first step faults the activations in, the second still runs
~10% slow while the allocator's free lists settle, on both models), then the fastest of
`--repeats` steps. An
earlier version alternated both models' steps in one process and called malloc_trim between
steps; that made titans-pytorch pay page faults for its large buffers every step (4.96 vs 3.45 s
at T=1k, 17.4 vs 7.2 s at 2k on the same host) and overstated our ratio, so it is gone.
`--plain-allocator` times under glibc's defaults instead.

Memory per token: each (model, T) runs one training step in a fresh subprocess. Inside it, after
the model is built, the kernel's peak-RSS mark is reset (`/proc/self/clear_refs` = 5, Linux), and
peak growth = VmHWM after the step - VmRSS before it. Divided by B*T. A fresh process matters:
after a first step the allocator keeps freed pages resident, so a second step shows no growth.

Usage: python bench/titans.py [--seq 1024 2048 4096] [--warmup 2] [--repeats 3] [--skip-ref-above 4096] [--no-memory]
       [--compile-memory] [--plain-allocator] [--no-flush-denormal]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from titanforge.trainer.cpu_env import huge_pages_env
from titanforge.trainer.perf import keep_freed_memory

from machine_info import cpu_model  # bench/machine_info.py (this folder is sys.path[0])

VOCAB, DIM, DEPTH, HEADS, B = 256, 256, 4, 4, 2
CHUNK = 16
SEGMENT = 64
# titans-pytorch FeedForward(dim, mult=4): GEGLU with inner width int(dim * 4 * 2 / 3).
FFN = int(DIM * 4 * 2 / 3)


def build_ours(T, compile_memory=False, memory_read="token"):
    from titanforge.models.config import ModelConfig
    from titanforge.models.registry import build_model
    from titanforge.models.titans.config import TitansConfig
    cfg = ModelConfig(family="titans", vocab_size=VOCAB, d_model=DIM, n_layers=DEPTH, n_heads=HEADS,
                      max_seq_len=T, ffn_hidden=FFN, titans=TitansConfig(variant="mac", memory_depth=2, memory_expansion=2,
                                                         chunk_size=CHUNK, segment_len=SEGMENT, n_persistent=4,
                                                         compile_memory=compile_memory, memory_read=memory_read,
                                                         inner_grad_clip=1.0))
    model = build_model(cfg)

    def step(tokens):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
    return model, step


def build_ref(T):
    from titans_pytorch import MemoryAsContextTransformer, MemoryMLP
    model = MemoryAsContextTransformer(
        num_tokens=VOCAB, dim=DIM, depth=DEPTH, segment_len=SEGMENT, neural_memory_segment_len=CHUNK,
        num_persist_mem_tokens=4, num_longterm_mem_tokens=0, dim_head=DIM // HEADS, heads=HEADS, ff_mult=4,
        num_residual_streams=1, neural_memory_model=MemoryMLP(dim=DIM // HEADS, depth=2, expansion_factor=2),
        neural_memory_kwargs=dict(heads=HEADS, dim_head=DIM // HEADS, max_grad_norm=1.0), use_flex_attn=False)

    def step(tokens):
        model(tokens, return_loss=True).backward()
    return model, step


BUILDERS = {"ours": build_ours, "titans_pytorch": build_ref,
            # Opt-in torch.compile of the memory's chunk chain (model.titans.compile_memory).
            "ours_compiled": lambda T: build_ours(T, compile_memory=True),
            # The chunk-start read (model.titans.memory_read: chunk), the speed option.
            "ours_chunk_read": lambda T: build_ours(T, memory_read="chunk")}


def time_steps(name, T, repeats, warmup=2):
    """In this (fresh) process: build `name` at T, `warmup` steps, then the fastest of `repeats`
    steps (seconds) and the first step's time."""
    torch.manual_seed(0)
    _, step = BUILDERS[name](T)
    tokens = torch.randint(0, VOCAB, (B, T + 1))
    times = []
    for _ in range(repeats + warmup):
        t0 = time.perf_counter()
        step(tokens)
        times.append(time.perf_counter() - t0)
    return min(times[warmup:]), times[0]


def child_args(args):
    return ["--chunk", str(CHUNK), "--segment", str(SEGMENT), "--threads", str(args.threads),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup)] + (["--plain-allocator"] if args.plain_allocator else []) \
        + ([] if args.flush_denormal else ["--no-flush-denormal"])


def child_env(args, **extra):
    """The children's environment: the launcher's (glibc huge-page malloc, launch/cli.py) unless
    --plain-allocator."""
    env = dict(os.environ, **extra)
    return env if args.plain_allocator else huge_pages_env(env)


def time_child(args, name, T):
    """(best, first) step seconds of `name` at T, timed alone in a fresh subprocess."""
    env = child_env(args, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run([sys.executable, __file__, "--time-child", name, str(T), *child_args(args)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"timing child {name} T={T} failed:\n{out.stderr[-3000:]}")
    best, first = map(float, out.stdout.split()[-2:])
    return best, first


def _proc_status_kib(*keys):
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                vals[k] = int(v.split()[0])
    return [vals[k] for k in keys]


def step_peak_growth(name, T):
    """In this (fresh) process: build the model, reset the peak-RSS mark, run one step; bytes."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    _, step = BUILDERS[name](T)
    tokens = torch.randint(0, VOCAB, (B, T + 1))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    (rss0,) = _proc_status_kib("VmRSS")
    step(tokens)
    (hwm,) = _proc_status_kib("VmHWM")
    return (hwm - rss0) * 1024


def peak_rss_child(args, name, T):
    """Peak RSS growth of one step of `name` at T, measured in a fresh subprocess (None on failure)."""
    out = subprocess.run([sys.executable, __file__, "--child", name, str(T), *child_args(args)],
                         capture_output=True, text=True, env=child_env(args))
    if out.returncode:
        print(f"memory child {name} T={T} failed: {out.stderr[-2000:]}", file=sys.stderr)
        return None
    return int(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones (>= 1)")
    ap.add_argument("--skip-ref-above", type=int, default=4096)
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the per-token peak RSS growth (one fresh subprocess per model and T)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/titans.json")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 keeps timings stable on a shared 2-core host")
    ap.add_argument("--chunk", type=int, default=16, help="memory chunk size b on both sides")
    ap.add_argument("--segment", type=int, default=64, help="MAC segment length on both sides")
    ap.add_argument("--compile-memory", action="store_true",
                    help="also time ours with model.titans.compile_memory (cold inductor cache; the first "
                         "step's time, compile included, is reported as ours_compiled_first_step_s)")
    ap.add_argument("--also-chunk-read", action="store_true",
                    help="also time ours with memory_read: chunk (speed only, no memory measure)")
    ap.add_argument("--time-child", nargs=2, metavar=("MODEL", "T"), help=argparse.SUPPRESS)
    # The trainer flushes denormals on CPU (train.flush_denormal); so do both models here: without
    # it Titans' deep-backprop gradients (T >= 2k) slow every op they touch ~30x.
    ap.add_argument("--no-flush-denormal", dest="flush_denormal", action="store_false")
    # The trainer keeps freed memory (train.keep_freed_memory); this times under glibc's defaults.
    ap.add_argument("--plain-allocator", action="store_true")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be >= 1: the first step pays the page faults of its activations")
    global CHUNK, SEGMENT
    CHUNK, SEGMENT = args.chunk, args.segment
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    if args.child:
        print(step_peak_growth(args.child[0], int(args.child[1])))
        return
    torch.set_num_threads(args.threads)
    if args.time_child:
        if not args.plain_allocator and not keep_freed_memory():
            raise SystemExit("keeping freed memory needs glibc (use --plain-allocator)")
        print(*time_steps(args.time_child[0], int(args.time_child[1]), args.repeats, args.warmup))
        return
    torch.manual_seed(0)
    if args.compile_memory:
        # A fresh inductor cache, so the first compiled step shows the real compile time.
        import tempfile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="titans_bench_inductor_")
    results = []
    for T in args.seq:
        names = ["ours"] + (["titans_pytorch"] if T <= args.skip_ref_above else []) + \
            (["ours_compiled"] if args.compile_memory else []) + (["ours_chunk_read"] if args.also_chunk_read else [])
        best, first = {}, {}
        for n in names:
            best[n], first[n] = time_child(args, n, T)
        row = {"seq_len": T, "batch": B}
        for n in names:
            row[f"{n}_step_s"] = round(best[n], 3)
            row[f"{n}_tokens_per_s"] = round(B * T / best[n], 1)
            row[f"{n}_s_per_1k_tokens"] = round(1000 * best[n] / (B * T), 3)
            if n == "ours_compiled":
                row[f"{n}_first_step_s"] = round(first[n], 1)
                continue
            if n == "ours_chunk_read":
                continue
            if args.memory:
                rss = peak_rss_child(args, n, T)
                row[f"{n}_peak_rss_growth_bytes_per_token"] = None if rss is None else round(rss / (B * T))
                if rss is not None and rss <= 0:
                    print(f"WARNING: {n} T={T}: peak RSS growth {rss} <= 0; the measure failed", file=sys.stderr)
        if "titans_pytorch" in names:
            row["speedup"] = round(best["titans_pytorch"] / best["ours"], 2)
            if "ours_chunk_read" in names:
                row["speedup_chunk_read"] = round(best["titans_pytorch"] / best["ours_chunk_read"], 2)
            if "ours_compiled" in names:
                row["speedup_compiled"] = round(best["titans_pytorch"] / best["ours_compiled"], 2)
        print(json.dumps(row), flush=True)
        results.append(row)
        write(args, results)


def write(args, results):
    model_name = cpu_model()
    meta = {"machine": model_name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1m_at_write": round(os.getloadavg()[0], 2),
            "allocator": ("glibc defaults" if args.plain_allocator
                          else "glibc, freed memory kept in the process (mallopt; the trainer's default) and "
                               "transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1; the launcher's default)"),
            "flush_denormal": args.flush_denormal,
            "titans_pytorch": __import__("importlib.metadata").metadata.version("titans-pytorch"),
            "config": dict(vocab=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS, batch=B, ffn_inner=FFN, memory_depth=2,
                           memory_expansion=2, chunk_size=CHUNK, segment_len=SEGMENT, n_persistent=4),
            "method": f"each model and T alone in a fresh process, min of {args.repeats} steps after {args.warmup} "
                      "warm-up steps; "
                      "peak RSS growth (VmHWM after - VmRSS before, mark reset via clear_refs) of the first "
                      "step in a fresh process per model and T, per token",
            "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv)}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
