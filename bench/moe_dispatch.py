"""MoE dispatch speed: sorted segments with torch._grouped_mm or a loop, against a per-expert mask loop.

All variants run forward + backward of the expert part on the same routing in one process, their
steps alternated, the fastest of several repeats kept (these CPU hosts are shared). Reported as
ratios to the reference, the Hugging Face Mixtral-style loop that finds each expert's tokens with
`torch.where(expert_ids == e)`. A dense SwiGLU with the same active width (k * H) shows the cost
of routing itself.

    .venv/bin/python bench/moe_dispatch.py [--tokens 2048] [--repeats 5]
writes bench/results/moe_dispatch.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from titanforge.models.common.moe import MoE, MoEConfig, combine, expert_forward, sort_tokens_by_expert

from machine_info import cpu_model  # bench/machine_info.py (this folder is sys.path[0])


def sorted_dispatch(x, ids, weights, w1, w3, w2, grouped_mm):
    k = ids.shape[-1]
    order, counts = sort_tokens_by_expert(ids, w1.shape[0])
    y = expert_forward(x[order // k], counts, w1, w3, w2, grouped_mm=grouped_mm)
    return combine(y, order, weights, x.shape[0])


def mask_loop_reference(x, ids, weights, w1, w3, w2):
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel():
            xe = x[tok]
            ye = (F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e]
            out = out.index_add(0, tok, ye * weights[tok, slot, None])
    return out


def dense_swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def step(fn, inputs, g):
    for t in inputs:
        t.grad = None
    t0 = time.perf_counter()
    fn().backward(g)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_dispatch.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    N, C, H, E, k = args.tokens, args.dim, args.hidden, args.experts, args.top_k

    moe = MoE(C, H, MoEConfig(n_experts=E, top_k=k))
    moe.init_weights()
    x = torch.randn(N, C, requires_grad=True)
    with torch.no_grad():
        r = moe.router(x)
    ids, weights = r.expert_ids, r.weights.detach().requires_grad_()
    w1, w3, w2 = moe.experts.w1, moe.experts.w3, moe.experts.w2
    dw1, dw3 = torch.randn(C, k * H, requires_grad=True), torch.randn(C, k * H, requires_grad=True)
    dw2 = torch.randn(k * H, C, requires_grad=True)
    g = torch.randn(N, C)
    grads = [x, weights, w1, w3, w2, dw1, dw3, dw2]

    variants = {
        "mask_loop_reference": lambda: mask_loop_reference(x, ids, weights, w1, w3, w2),
        "sorted_grouped_mm": lambda: sorted_dispatch(x, ids, weights, w1, w3, w2, True),
        "sorted_loop": lambda: sorted_dispatch(x, ids, weights, w1, w3, w2, False),
        "full_moe_layer": lambda: moe(x[None]).view(N, C),
        "dense_swiglu_same_active_width": lambda: dense_swiglu(x, dw1, dw3, dw2),
    }
    ref = variants["mask_loop_reference"]()
    for name in ("sorted_grouped_mm", "sorted_loop"):
        err = ((variants[name]() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (name, err)

    best = {name: float("inf") for name in variants}
    for name, fn in variants.items():  # warm-up
        step(fn, grads, g)
    for _ in range(args.repeats):
        for name, fn in variants.items():
            best[name] = min(best[name], step(fn, grads, g))

    cpu = cpu_model()
    result = {
        "what": "forward+backward seconds (min of repeats) and ratio to mask_loop_reference (lower is faster)",
        "shape": {"tokens": N, "dim": C, "expert_hidden": H, "experts": E, "top_k": k, "dtype": "float32"},
        "seconds": {n: round(t, 5) for n, t in best.items()},
        "ratio_to_reference": {n: round(t / best["mask_loop_reference"], 3) for n, t in best.items()},
        "machine": {"cpu": cpu, "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "repeats": args.repeats,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
