"""Jamba training-step speed on CPU: tokens/s of forward + backward against Hugging Face Jamba.

Both models have the configs/jamba-tiny.yaml architecture and the same weights (HF's are mapped
from ours by models/jamba/hf.py); `--vocab-sizes` runs it at several vocabularies (default: the
preset's 50304, GPT-2's, and 8192, a tiny model's BPE: at width 128 the 50304-way head and its
cross entropy are over half of either model's step, identical work in both, which is why issue 5's
HF figure of about 1,120 tokens/s at 1k fits the smaller vocabulary). HF runs its CPU path with `use_mambapy=True` (the mamba.py
parallel scan; without the `mambapy` package HF falls back to its per-token loop, and the JSON
says which ran). One step = logits for a [1, T] batch, cross entropy against the next tokens, backward. Steps of the two
models alternate in one process and the fastest of several repeats is kept, since these hosts are
shared. "Linear in T" is checked by reporting seconds per 1k tokens at each T. `breakdown` times
each kind of component alone (forward + backward of one layer of each kind, times the number of
such layers; head = final norm, LM head and cross entropy), again alternating the two models.

    .venv/bin/python bench/jamba.py [--vocab-sizes 8192 50304] [--lengths 1024 2048 4096] [--repeats 3]
                                    [--threads 1 2]
writes bench/results/jamba.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from titanforge.launch.config import load_config
from titanforge.models.jamba.hf import to_hf
from titanforge.models.registry import build_model
from titanforge.trainer.perf import keep_freed_memory

from machine_info import cpu_model  # bench/machine_info.py (this folder is sys.path[0])

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    cpu = cpu_model()
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": version("transformers"), "mambapy": version("mambapy"),
            "python": platform.python_version(), "load_average_at_start": os.getloadavg()}


def step(model, tokens, hf: bool) -> float:
    """One training step on tokens [1, T + 1]: inputs are the first T, targets the last T (as the
    trainer shifts them before the model, so no [T, V] logits slice is copied on either side)."""
    t0 = time.perf_counter()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs).logits if hf else model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def _component_fns(ours, hf, tokens):
    """{name: (n_layers, ours_fn, hf_fn)}: each fn maps an input [1, T, C] to a scalar."""
    def first(kind):
        return next(i for i, sp in enumerate(ours.specs) if (sp.mixer if kind in ("mamba", "attention") else sp.ffn) == kind)
    count = lambda kind: sum(1 for sp in ours.specs if kind in (sp.mixer, sp.ffn))  # noqa: E731
    hl = hf.model.layers
    out = {}
    for kind in ("mamba", "attention"):
        i = first(kind)
        hf_mixer = hl[i].mamba if kind == "mamba" else hl[i].self_attn
        ours_fn = lambda x, m=ours.layers[str(i)].mixer: m(x).square().mean()  # noqa: E731
        if kind == "mamba":
            hf_fn = lambda x, m=hf_mixer: m(x).square().mean()  # noqa: E731
        else:
            T = tokens.shape[1] - 1
            pos = torch.arange(T)[None]
            mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
            hf_fn = lambda x, m=hf_mixer: m(x, attention_mask=mask, position_ids=pos)[0].square().mean()  # noqa: E731
        out[kind] = (count(kind), ours_fn, hf_fn)
    for kind in ("moe", "mlp"):
        i = first(kind)
        out[kind] = (count(kind), lambda x, m=ours.layers[str(i)].feed_forward: m(x).square().mean(),
                     lambda x, m=hl[i].feed_forward: m(x).square().mean())

    def head(norm, weight):
        def fn(x):
            logits = norm(x) @ weight.t()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        return fn
    out["head"] = (1, head(ours.norm, ours.tok_embeddings.weight if ours.output is None else ours.output.weight),
                   head(hf.model.final_layernorm, hf.lm_head.weight))
    return out


def breakdown(ours, hf, tokens, repeats: int) -> dict:
    """Seconds per step spent in each kind of component (one layer timed, times the layer count)."""
    x = torch.randn(1, tokens.shape[1] - 1, ours.cfg.d_model) * 0.5

    def timed(fn):
        xx = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        fn(xx).backward()
        return time.perf_counter() - t0

    rows = {}
    for name, (n, fo, fh) in _component_fns(ours, hf, tokens).items():
        timed(fo), timed(fh)
        bo = bh = float("inf")
        for _ in range(repeats):
            bo, bh = min(bo, timed(fo)), min(bh, timed(fh))
        rows[name] = {"layers": n, "ours_s": round(n * bo, 4), "hf_s": round(n * bh, 4), "speedup": round(bh / bo, 2)}
        ours.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
    return rows


def run_config(cfg, lengths, repeats, with_breakdown):
    from transformers import JambaForCausalLM

    torch.manual_seed(0)
    ours = build_model(cfg)
    hf_config, sd = to_hf(ours)
    hf_config.use_mambapy = True
    hf = JambaForCausalLM(hf_config)
    hf.load_state_dict(sd)
    ours.train()
    hf.train()
    rows = []
    for T in lengths:
        tokens = torch.randint(0, cfg.vocab_size, (1, T + 1))
        step(ours, tokens, False), step(hf, tokens, True)  # warm-up
        best = {"ours": float("inf"), "hf": float("inf")}
        for _ in range(repeats):
            best["ours"] = min(best["ours"], step(ours, tokens, False))
            best["hf"] = min(best["hf"], step(hf, tokens, True))
        row = {"vocab_size": cfg.vocab_size, "T": T, "ours_s": round(best["ours"], 3), "hf_s": round(best["hf"], 3),
               "ours_tokens_per_s": round(T / best["ours"], 1), "hf_tokens_per_s": round(T / best["hf"], 1),
               "speedup": round(best["hf"] / best["ours"], 2),
               "ours_s_per_1k_tokens": round(best["ours"] / T * 1024, 3),
               "hf_s_per_1k_tokens": round(best["hf"] / T * 1024, 3)}
        if with_breakdown:
            row["breakdown"] = breakdown(ours, hf, tokens, repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return sum(p.numel() for p in ours.parameters()), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/jamba-tiny.yaml"))
    ap.add_argument("--vocab-sizes", type=int, nargs="+", default=[8192, 50304])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-breakdown", action="store_true")
    # One thread by default (the hosts are shared 2-core machines); several counts run in turn,
    # each row says its own.
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    # glibc returns freed blocks over 32 MB (and the heap top) to the OS, so every step page-faults
    # its activations in again; this keeps freed memory in the process, as jemalloc/tcmalloc do.
    # It applies to both models alike and is off by default (the plain-process numbers).
    ap.add_argument("--keep-freed-memory", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results/jamba.json"))
    # The trainer flushes denormals on CPU (train.flush_denormal); so do both models here, in this
    # process: without it Titans' deep-backprop gradients (T >= 2k) slow every op they touch ~30x.
    ap.add_argument("--no-flush-denormal", dest="flush_denormal", action="store_false")
    args = ap.parse_args()
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory needs glibc")

    from transformers.utils.import_utils import is_mambapy_available

    info = machine()
    del info["torch_threads"]  # per row
    info["keep_freed_memory"] = args.keep_freed_memory
    info["flush_denormal"] = args.flush_denormal
    info["hf_scan"] = "mambapy pscan" if is_mambapy_available() else "sequential loop (mambapy missing)"
    if not is_mambapy_available():
        # HF's per-token loop is ~30x slower than its pscan: the ratio would flatter us.
        print("warning: mambapy is not installed (pip install -e '.[bench]'); HF runs its per-token loop",
              file=sys.stderr, flush=True)
    rows, n_params = [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for V in args.vocab_sizes:
            cfg = load_config(args.config).model
            cfg.vocab_size = V
            n_params[V], r = run_config(cfg, args.lengths, args.repeats, not args.no_breakdown)
            rows += [{"threads": threads, **row} for row in r]
    # The hosts are shared: the load at the end shows whether other work ran during the steps.
    info["load_average_at_end"] = os.getloadavg()
    result = {"benchmark": "Jamba forward+backward tokens/s, batch 1, ours vs HF JambaForCausalLM (CPU)",
              "config": Path(args.config).name, "vocab_sizes": args.vocab_sizes, "n_params": n_params,
              "repeats": args.repeats, "machine": info, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
