"""Baseline training step on CPU: our Llama against Hugging Face LlamaForCausalLM, same weights.

One process, the two models' steps alternated, the fastest of several repeats each (shared
2-core machines are noisy: STACK-FACTS). A step is forward + cross-entropy + backward + AdamW.
Writes bench/results/train_step.json with the machine it ran on.

    .venv/bin/python bench/train_step.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from titanforge.models.config import ModelConfig
from titanforge.models.llama.hf import hf_config, to_hf_state_dict
from titanforge.models.registry import build_model

from machine_info import cpu_model  # bench/machine_info.py (this folder is sys.path[0])

RESULTS = Path(__file__).parent / "results" / "train_step.json"


def machine() -> dict:
    cpu = cpu_model()
    return {"cpu": cpu, "cores": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def step_time(model, tokens, logits_of, opt) -> float:
    t0 = time.perf_counter()
    logits = logits_of(model, tokens[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=8)
    # One thread by default: on a shared 2-core host two threads make both models' times noisy.
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    cfg = ModelConfig(family="llama", vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                      max_seq_len=512, tie_embeddings=True)
    batch, seq = 4, 512
    torch.manual_seed(0)
    ours = build_model(cfg)
    hf = LlamaForCausalLM(hf_config(cfg))
    hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    hf.tie_weights()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    runners = {
        "titanforge": (ours, lambda m, x: m(x), torch.optim.AdamW(ours.parameters(), lr=1e-4)),
        "hf_llama": (hf, lambda m, x: m(input_ids=x).logits, torch.optim.AdamW(hf.parameters(), lr=1e-4)),
    }
    times = {k: [] for k in runners}
    for name, (m, f, o) in runners.items():  # warm-up
        step_time(m, tokens, f, o)
    for _ in range(args.repeats):
        for name, (m, f, o) in runners.items():
            times[name].append(step_time(m, tokens, f, o))
    best = {k: min(v) for k, v in times.items()}
    n_tokens = batch * seq
    result = {
        "benchmark": "llama training step (fwd + CE + bwd + AdamW), CPU float32",
        "config": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                   "n_kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size, "batch": batch, "seq_len": seq},
        "machine": machine(),
        "step_s": best,
        "tokens_per_s": {k: n_tokens / v for k, v in best.items()},
        "flops_per_token": ours.flops_per_token(seq),
        "speedup_vs_hf": best["hf_llama"] / best["titanforge"],
        "repeats": args.repeats,
        "threads": args.threads,
        "load_average_1m": __import__("os").getloadavg()[0],
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
