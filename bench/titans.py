"""CPU forward+backward throughput of our Titans MAC against titans-pytorch 0.5.5 at one config.

Config (both sides): dim 256, depth 4, 4 heads of 64, SwiGLU/GEGLU ffn ~ 8/3 dim, memory MLP of
depth 2 and expansion 2 per head, memory chunk 16, segment 64, 4 persistent tokens, vocab 256,
B = 2. titans-pytorch gets no long-term memory tokens and no hyper-connections
(num_residual_streams = 1), so both run the same amount of sequence mixing. Both models run in
this one process; steps alternate and each figure is the fastest of `--repeats` steps.
Memory per token: peak RSS growth (ru_maxrss) measured in a fresh subprocess per model and T.

Usage: python bench/titans.py [--seq 1024 2048 4096] [--repeats 3] [--skip-ref-above 4096]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VOCAB, DIM, DEPTH, HEADS, B = 256, 256, 4, 4, 2
CHUNK = 16
SEGMENT = 64


def build_ours(T):
    from titanforge.models.config import ModelConfig
    from titanforge.models.registry import build_model
    from titanforge.models.titans.config import TitansConfig
    cfg = ModelConfig(family="titans", vocab_size=VOCAB, d_model=DIM, n_layers=DEPTH, n_heads=HEADS,
                      max_seq_len=T, titans=TitansConfig(variant="mac", memory_depth=2, memory_expansion=2,
                                                         chunk_size=CHUNK, segment_len=SEGMENT, n_persistent=4))
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
        neural_memory_kwargs=dict(heads=HEADS, dim_head=DIM // HEADS), use_flex_attn=False)

    def step(tokens):
        model(tokens, return_loss=True).backward()
    return model, step


BUILDERS = {"ours": build_ours, "titans_pytorch": build_ref}


def timed(step, tokens):
    t0 = time.perf_counter()
    step(tokens)
    return time.perf_counter() - t0


def peak_rss_child(name, T):
    """Run one step in a fresh process; report peak RSS growth over the process after model build."""
    code = (f"import resource,torch,sys; sys.argv=['x']; import bench_titans_mod as b; torch.manual_seed(0);"
            f"torch.set_num_threads(1); b.CHUNK={CHUNK}; b.SEGMENT={SEGMENT};"
            f"m,s=b.BUILDERS[{name!r}]({T}); x=torch.randint(0,b.VOCAB,(b.B,{T}+1));"
            f"r0=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; s(x);"
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-r0)")
    env_path = str(__import__("pathlib").Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r}); "
                          f"import importlib.util as u; spec=u.spec_from_file_location('bench_titans_mod', "
                          f"{__file__!r}); mod=u.module_from_spec(spec); sys.modules['bench_titans_mod']=mod; "
                          f"spec.loader.exec_module(mod); " + code.replace("import bench_titans_mod as b; ", "b=mod; ")],
                         capture_output=True, text=True)
    if out.returncode:
        return None
    return int(out.stdout.strip().splitlines()[-1]) * 1024  # ru_maxrss is KiB on Linux


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-ref-above", type=int, default=4096)
    ap.add_argument("--memory", action="store_true",
                    help="also measure peak RSS growth per token (unvalidated: reported 0 in the first run)")
    ap.add_argument("--out", default="bench/results/titans.json")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 keeps timings stable on a shared 2-core host")
    ap.add_argument("--chunk", type=int, default=16, help="memory chunk size b on both sides")
    ap.add_argument("--segment", type=int, default=64, help="MAC segment length on both sides")
    args = ap.parse_args()
    global CHUNK, SEGMENT
    CHUNK, SEGMENT = args.chunk, args.segment
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for T in args.seq:
        names = ["ours"] + (["titans_pytorch"] if T <= args.skip_ref_above else [])
        steps = {n: BUILDERS[n](T)[1] for n in names}
        tokens = torch.randint(0, VOCAB, (B, T + 1))
        best = {n: float("inf") for n in names}
        for n in names:  # warm-up step, not timed
            timed(steps[n], tokens)
        for _ in range(args.repeats):
            for n in names:
                best[n] = min(best[n], timed(steps[n], tokens))
        row = {"seq_len": T, "batch": B}
        for n in names:
            row[f"{n}_step_s"] = round(best[n], 3)
            row[f"{n}_tokens_per_s"] = round(B * T / best[n], 1)
            if args.memory:
                rss = peak_rss_child(n, T)
                row[f"{n}_peak_rss_growth_bytes_per_token"] = None if rss is None else round(rss / (B * T))
        if "titans_pytorch" in names:
            row["speedup"] = round(best["titans_pytorch"] / best["ours"], 2)
        print(json.dumps(row), flush=True)
        results.append(row)
        write(args, results)


def write(args, results):
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    meta = {"machine": model_name, "cores": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1m_at_write": round(__import__("os").getloadavg()[0], 2),
            "titans_pytorch": __import__("importlib.metadata").metadata.version("titans-pytorch"),
            "config": dict(vocab=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS, batch=B, memory_depth=2,
                           memory_expansion=2, chunk_size=CHUNK, segment_len=SEGMENT, n_persistent=4),
            "method": "one process, steps alternate, min of repeats after one warm-up step; "
                      "peak RSS growth of one step in a fresh process per model and T"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
