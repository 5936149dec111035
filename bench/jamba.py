"""Jamba training-step speed on CPU: tokens/s of forward + backward against Hugging Face Jamba.

Both models have the configs/jamba-tiny.yaml architecture and the same weights (HF's are mapped
from ours by models/jamba/hf.py). HF runs its CPU path with `use_mambapy=True` (the mamba.py
parallel scan; without the `mambapy` package HF falls back to its per-token loop, and the JSON
says which ran). One step = logits for a [1, T] batch, cross entropy, backward. Steps of the two
models alternate in one process and the fastest of several repeats is kept, since these hosts are
shared. "Linear in T" is checked by reporting seconds per 1k tokens at each T.

    .venv/bin/python bench/jamba.py [--lengths 1024 2048 4096] [--repeats 3]
writes bench/results/jamba.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from titanforge.launch.config import load_config
from titanforge.models.jamba.hf import to_hf
from titanforge.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        cpu = platform.processor()
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": version("transformers"), "mambapy": version("mambapy"),
            "python": platform.python_version(), "load_average_at_start": os.getloadavg()}


def step(model, tokens, hf: bool) -> float:
    t0 = time.perf_counter()
    logits = model(tokens).logits if hf else model(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/jamba-tiny.yaml"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/results/jamba.json"))
    args = ap.parse_args()

    from transformers import JambaForCausalLM
    from transformers.utils.import_utils import is_mambapy_available

    cfg = load_config(args.config).model
    torch.manual_seed(0)
    ours = build_model(cfg)
    hf_config, sd = to_hf(ours)
    hf_config.use_mambapy = True
    hf = JambaForCausalLM(hf_config)
    hf.load_state_dict(sd)
    ours.train()
    hf.train()
    info = machine()
    info["hf_scan"] = "mambapy pscan" if is_mambapy_available() else "sequential loop (mambapy missing)"
    rows = []
    for T in args.lengths:
        tokens = torch.randint(0, cfg.vocab_size, (1, T))
        step(ours, tokens, False), step(hf, tokens, True)  # warm-up
        best = {"ours": float("inf"), "hf": float("inf")}
        for _ in range(args.repeats):
            best["ours"] = min(best["ours"], step(ours, tokens, False))
            best["hf"] = min(best["hf"], step(hf, tokens, True))
        row = {"T": T, "ours_s": round(best["ours"], 3), "hf_s": round(best["hf"], 3),
               "ours_tokens_per_s": round(T / best["ours"], 1), "hf_tokens_per_s": round(T / best["hf"], 1),
               "speedup": round(best["hf"] / best["ours"], 2),
               "ours_s_per_1k_tokens": round(best["ours"] / T * 1024, 3),
               "hf_s_per_1k_tokens": round(best["hf"] / T * 1024, 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"benchmark": "Jamba forward+backward tokens/s, batch 1, ours vs HF JambaForCausalLM (CPU)",
              "config": Path(args.config).name, "n_params": sum(p.numel() for p in ours.parameters()),
              "repeats": args.repeats, "machine": info, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
