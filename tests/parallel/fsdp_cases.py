"""Shared pieces of the data-parallel tests: tiny model per family, batches, loss, comparisons.

Imported by the torchrun workers (tests/parallel/fsdp_*worker.py) and by the pytest files, so
the single-process reference and the sharded runs build exactly the same thing.

The reference is one process on the global batch, taken as `dp` equal micro-batches with gradient
accumulation. Cross-entropy is a token mean and the micro-batches are equal, so this equals the
full-batch gradient; the MoE load-balancing loss is defined per micro-batch (as under DDP), which
is why the reference keeps the micro-batches rather than one forward over the whole batch.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from titanforge.models.common.moe import MoEConfig
from titanforge.models.config import ModelConfig
from titanforge.models.jamba.config import JambaConfig
from titanforge.models.registry import build_model, collect_aux_losses
from titanforge.models.titans.config import TitansConfig
from titanforge.models.ttt.config import TTTConfig

FAMILIES = ("llama", "titans", "ttt", "jamba")
# The other variants, checked for one step's loss and gradients only (the launch stays short).
VARIANTS = ("titans-mag", "titans-mal", "titans-lmm", "ttt-mlp")
# Odd sizes on purpose: vocabulary and length are not powers of two.
VOCAB, SEQ_LEN, GLOBAL_BATCH = 97, 37, 4
LR, STEPS = 1e-2, 5


def worker_main(main) -> None:
    """A gloo worker's entry: main(); a failure prints its traceback and exits 1. After a clean run
    (results written, process group destroyed) the process leaves with os._exit(0), skipping the
    interpreter's teardown: in fresh-clone CI runs a rank of these workers sometimes aborted there
    with "terminate called without an active exception" (gloo's C++ worker threads being destroyed
    during interpreter finalisation; pytorch/pytorch#179291 describes the mechanism)."""
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def record(results: dict, key: str, run, *args) -> None:
    """results[key] = run(*args), or the traceback it raised: recorded per case so that one failure
    does not hide the others (the pytest side reports each case's error)."""
    try:
        results[key] = run(*args)
    except Exception:
        results[key] = {"error": traceback.format_exc()}


def write_results(out_dir: str, results: dict) -> None:
    """This rank's results to OUT_DIR/rank<r>.json, then wait for all ranks and leave the group."""
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def tiny_config(name: str) -> ModelConfig:
    """`family` or `family-variant` (titans-mag, ttt-mlp, ...)."""
    family, _, variant = name.partition("-")
    common = dict(family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, ffn_hidden=48,
                  max_seq_len=64, tie_embeddings=family != "llama")
    if family == "llama":
        return ModelConfig(**common, n_kv_heads=1)
    if family == "titans":
        titans = TitansConfig(variant=variant or "mac", chunk_size=8, segment_len=16, window=16, n_persistent=2)
        return ModelConfig(**common, titans=titans)
    if family == "ttt":
        return ModelConfig(**common, ttt=TTTConfig(inner=variant or "linear", backbone="mamba", mini_batch_size=8))
    if family == "jamba":
        moe = MoEConfig(n_experts=4, top_k=2, load_balance_coef=1e-2, z_loss_coef=1e-3)
        return ModelConfig(**common, n_kv_heads=1, jamba=JambaConfig(layer_pattern="MD AE", d_state=8, chunk_size=16,
                                                                     moe=moe))
    raise ValueError(family)


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_config(family))


def global_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world)[rank]


def loss_fn(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    for aux in collect_aux_losses(model).values():
        loss = loss + aux
    return loss


def reference_step(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, dp: int) -> float:
    """Forward + backward of the global batch as `dp` accumulated micro-batches; returns the loss."""
    total = 0.0
    for r in range(dp):
        loss = loss_fn(model, shard(inputs, r, dp), shard(targets, r, dp)) / dp
        loss.backward()
        total += loss.item()
    return total


def optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    # The trainer's AdamW settings (weight decay on matrices only is irrelevant for parity).
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)


def reference_training(model: torch.nn.Module, dp: int, clip: float = 0.0) -> list[float]:
    """STEPS AdamW steps on the same global batch (`dp` micro-batches); the losses before each step."""
    model = copy.deepcopy(model)
    opt = optimizer(model)
    inputs, targets = global_batch()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        losses.append(reference_step(model, inputs, targets, dp))
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return losses


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def flat_state(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested state dicts (model / optimizer) -> {dotted key: tensor}, DTensors made full."""
    out = {}
    for key, val in state.items():
        name = f"{prefix}{key}"
        if isinstance(val, dict):
            out.update(flat_state(val, name + "."))
        elif isinstance(val, list):
            out.update(flat_state(dict(enumerate(val)), name + "."))
        elif isinstance(val, torch.Tensor):
            out[name] = val.full_tensor() if hasattr(val, "full_tensor") else val
        elif isinstance(val, (int, float)):
            out[name] = torch.tensor(float(val))
    return out


def torchrun(nproc: int, script: str, *args: str, timeout: float = 300) -> None:
    """Launch tests/parallel/<script> on `nproc` gloo ranks; raise with the output tail if it fails."""
    here = Path(__file__).parent
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(here / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
