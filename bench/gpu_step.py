"""One training step per family at ~350M parameters on a GPU: tokens/s and MFU with the kernels.

Each family is built at d_model 1024 (Llama 24 layers, 355M; TTT-Linear 24, 358M; Titans MAC 16, 343M;
Jamba 16 with 4 experts top-2 and ffn 2048, 405M total), bf16 autocast, the fused linear +
cross-entropy head, AdamW; one warm-up step,
then the median of `--steps` timed steps (CUDA events). MFU = the model's own flops_per_token x
tokens/s / the GPU's dense bf16 peak (trainer/perf.py). A family that fails (out of memory, an
error in a kernel) records its error and the others still run.

    .venv/bin/python bench/gpu_step.py [--batch 4] [--seq 2048] [--steps 3] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

from titanforge.models.common.moe import MoEConfig
from titanforge.models.config import ModelConfig
from titanforge.models.jamba.config import JambaConfig
from titanforge.models.registry import build_model
from titanforge.models.titans.config import TitansConfig
from titanforge.models.ttt.config import TTTConfig
from titanforge.trainer.perf import peak_flops

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(vocab_size=50304, d_model=1024, n_heads=16, max_seq_len=4096, tie_embeddings=True)
FAMILIES = {
    "llama": dict(family="llama", n_layers=24),
    "ttt_linear": dict(family="ttt", n_layers=24, ttt=TTTConfig(inner="linear", backbone="mamba")),
    "titans_mac": dict(family="titans", n_layers=16, titans=TitansConfig(variant="mac")),
    "jamba": dict(family="jamba", n_layers=16, ffn_hidden=2048,
                  jamba=JambaConfig(moe=MoEConfig(n_experts=4, top_k=2, topk_norm="none", load_balance_coef=1e-3))),
}


def step_time(model, opt, tokens, steps: int) -> float:
    def one():
        model.loss_targets = tokens[:, 1:]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1])
        model.loss_targets = None
        aux = sum(v for m in model.modules() for v in (getattr(m, "aux_losses", None) or {}).values())
        (loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    one()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        one()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--families", nargs="*", default=list(FAMILIES))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_step.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_step.py needs a CUDA GPU")
    device = torch.device("cuda")
    peak = peak_flops(device, dtype="bfloat16")
    rows = {}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/gpu_step.py " + " ".join(f"--{k}={v}" for k, v in vars(args).items()),
              "device": torch.cuda.get_device_name(), "peak_bf16_TFLOP/s": peak / 1e12,
              "batch": args.batch, "seq": args.seq, "families": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = opt = None
    for name in args.families:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            cfg = ModelConfig(**BASE, **FAMILIES[name])
            torch.manual_seed(0)
            model = build_model(cfg, device=device)
            n_params = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
            t = step_time(model, opt, tokens, args.steps)
            tps = args.batch * args.seq / t
            mfu = model.flops_per_token(args.seq) * tps / peak
            rows[name] = {"params_M": round(n_params / 1e6, 1), "step_s": round(t, 4), "tokens_per_s": round(tps),
                          "mfu": round(mfu, 4), "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
        except Exception as e:  # noqa: BLE001  one family's failure is a result, not the end of the run
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        print(name, rows[name], flush=True)
        model = opt = None
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # partial runs still report
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
