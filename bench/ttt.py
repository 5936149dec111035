"""TTT-Linear speed on CPU: our dual form against fla's plain-PyTorch TTT reference.

A small TTT-Linear model (d_model 256, 4 heads, 2 layers, transformer backbone, mini-batch 16,
vocabulary 4096 so the LM head does not dominate), batch 2, forward + backward at T = 1k, 2k, 4k.
Two variants of the same model with the same weights and tokens differ only in the TTT op:

- `titanforge`: `chunk_ttt_linear` as the model calls it (backend "auto": on CPU the fused C loop
  of kernels/ttt/fused_cpu.py, one task per batch row and head; the PyTorch dual form of chunk.py
  where no C compiler is found);
- `fla_ref`: `fla.ops.ttt.naive.chunk_ttt_linear_ref` from fla-core 0.6.0 (also a dual-form loop
  over mini-batches in PyTorch; its learning rate is per row only and its output adds LN(Z) to Z,
  so its numbers differ slightly from ours, but it does the same work per token). It indexes
  x[i] per mini-batch, whose backward costs O(T) each, so its step time grows faster than T.

Steps of the variants are alternated in one process and the fastest of several repeats kept
(these CPU hosts are shared). Reported: wall-clock tokens/s, the speed ratio to fla_ref on wall
and on process CPU time (one thread, so CPU time is what the step costs when the host is busy),
and CPU seconds per 1k tokens (flat in T means the step time is linear in T).

    .venv/bin/python bench/ttt.py [--lengths 1024 2048 4096] [--repeats 3]
writes bench/results/ttt.json. Needs `pip install --no-deps fla-core==0.6.0` (imports in ~8 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from titanforge.models.config import ModelConfig
from titanforge.models.registry import build_model
from titanforge.models.ttt import layer as ttt_layer
from titanforge.models.ttt.config import TTTConfig

from machine_info import cpu_model  # bench/machine_info.py (this folder is sys.path[0])

OURS = ttt_layer.chunk_ttt_linear


def fla_ttt_linear(q, k, v, eta, token_eta, ln_weight, ln_bias, initial_state, eps=1e-6):
    """Our op's signature over fla's reference: eta [B, T, H] -> [B, T, H, 1], bias state gets a
    singleton time axis, no q scaling (ours has none). token_eta has no counterpart in fla."""
    from fla.ops.ttt.naive import chunk_ttt_linear_ref

    W, b = initial_state
    o, h, hb = chunk_ttt_linear_ref(q, k, v, ln_weight, ln_bias, eta.unsqueeze(-1), scale=1.0, eps=eps,
                                    mini_batch_size=token_eta.shape[0], initial_state=W,
                                    initial_state_bias=b.unsqueeze(-2), output_final_state=True)
    return o.to(q.dtype), (h, hb.squeeze(-2))


VARIANTS = {"titanforge": OURS, "fla_ref": fla_ttt_linear}


def step(model, tokens) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return time.perf_counter() - t0, time.process_time() - c0


def machine() -> dict:
    cpu = cpu_model()
    from importlib.metadata import version

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "fla_core": version("fla-core"), "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    # One thread by default: on these shared, oversubscribed 2-core hosts two threads per
    # process made steps several times slower and far noisier.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ttt.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fla.ops.ttt.naive  # noqa: F401  (slow import, done before timing)

    torch.manual_seed(0)
    cfg = ModelConfig(family="ttt", vocab_size=4096, d_model=256, n_layers=2, n_heads=4,
                      max_seq_len=max(args.lengths) + 1,
                      ttt=TTTConfig(inner="linear", backbone="transformer", mini_batch_size=16))
    model = build_model(cfg)
    rows = []
    for T in args.lengths:
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, T + 1))
        best = {name: float("inf") for name in VARIANTS}
        best_cpu = dict(best)
        for _ in range(args.repeats):
            for name, op in VARIANTS.items():
                ttt_layer.chunk_ttt_linear = op
                wall, cpu = step(model, tokens)
                best[name], best_cpu[name] = min(best[name], wall), min(best_cpu[name], cpu)
        ttt_layer.chunk_ttt_linear = OURS
        row = {"T": T, "batch": args.batch}
        for name, s in best.items():
            row[f"{name}_s"] = round(s, 4)
            row[f"{name}_cpu_s"] = round(best_cpu[name], 4)
            row[f"{name}_tokens_per_s"] = round(args.batch * T / s, 1)
            row[f"{name}_cpu_s_per_1k_tokens"] = round(best_cpu[name] / (args.batch * T / 1000), 4)
        row["speedup_vs_fla_ref"] = round(best["fla_ref"] / best["titanforge"], 3)
        row["cpu_speedup_vs_fla_ref"] = round(best_cpu["fla_ref"] / best_cpu["titanforge"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"benchmark": "TTT-Linear model forward+backward, CPU", "machine": machine(),
              "model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                        "vocab_size": cfg.vocab_size, "mini_batch_size": cfg.ttt.mini_batch_size,
                        "backbone": cfg.ttt.backbone},
              "method": f"alternating steps in one process, min of {args.repeats} repeats, "
                        f"{args.threads} torch thread(s); 1-min load average {load_start:.1f} at the start, "
                        f"{os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores, shared)",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
