"""torchrun worker (2 gloo ranks): SVF fine-tuning's sharded start (trainer/svf.py:SVFStart)
against one process.

Rank 0 writes a base model (seed 3) under our own names (`model.safetensors`, what `titanforge
export` writes). For each layout the trainer's step object is built with finetune.method=svf and
init.from=that directory (meta model -> SVF on meta -> layout -> each rank fills its shards and
the SVD factors), one step's forward and backward runs on a fixed global batch, and the loss and
every z gradient (made full) are compared with one process: the plain base model read from the
same file, `prepare_svf`, the same batch. The layouts, in order: Llama under fsdp (dp=2; the SVD
cache beside init.from is written), tp (tp=2; the cache is read) and DDP (dp=2), then Llama, Titans MAC,
TTT-Linear and Jamba under fsdp and tp with no init.from (the base is the seed's, drawn matrix by
matrix). Each rank also reports which whole base matrices it read and the
bytes of the parameters it holds.

argv: OUT_DIR. Writes OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

from fsdp_cases import tiny_config, worker_main
from titanforge.launch.config import JobConfig
from titanforge.models.registry import build_model
from titanforge.models.svf import SVFConfig, apply_svf, svf_modules
from titanforge.parallel import ParallelDims, build_mesh
from titanforge.parallel.config import ParallelConfig
from titanforge.parallel.init import model_tensors
from titanforge.trainer.config import FinetuneConfig, TrainConfig
from titanforge.trainer.dist import DistInfo
from titanforge.trainer.step import build_plain_model, build_train_step, lm_loss
from titanforge.trainer.svf import prepare_svf

FSDP, TP = dict(dp_backend="fsdp"), dict(tp=2, dp_backend="fsdp")
# (name, family, layout, start from the saved base): Llama from init.from (the cache is written,
# then read), every family from the seed (no init.from: nothing cached).
LAYOUTS = [("fsdp", "llama", FSDP, True), ("tp", "llama", TP, True), ("ddp", "llama", dict(dp_backend="ddp"), True)] + [
    (f"{layout}_seed_{family}", family, pcfg, False) for family in ("llama", "titans", "ttt", "jamba")
    for layout, pcfg in (("fsdp", FSDP), ("tp", TP))]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def reference(cfg, state: dict | None, seed: int, tokens: torch.Tensor, dp: int) -> tuple[float, dict]:
    """Loss and z gradients of the whole SVF model in this one process, the global batch taken as
    `dp` accumulated micro-batches as the layout does (MoE auxiliary losses are per micro-batch)."""
    job = JobConfig(model=cfg, train=TrainConfig(seed=seed))
    model = build_plain_model(job, torch.device("cpu"))
    if state is not None:
        model.load_state_dict(state, strict=False)
    prepare_svf(model, SVFConfig())
    losses = []
    for part in tokens.chunk(dp):
        loss, total = lm_loss(model, model, part, torch.autocast("cpu", enabled=False))
        (total / dp).backward()
        losses.append(loss.item())
    return sum(losses) / dp, {n: m.z.grad.clone() for n, m in svf_modules(model).items()}


def main() -> None:
    from safetensors.torch import load_file, save_file

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = sys.argv[1]
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    # Even vocabulary and kv heads so tp=2 fits every family.
    configs = {f: dataclasses.replace(tiny_config(f), vocab_size=98, n_kv_heads=2)
               for f in ("llama", "titans", "ttt", "jamba")}
    cfg = configs["llama"]
    src = os.path.join(out_dir, "base")
    if rank == 0:
        os.makedirs(src)
        base = build_plain_model(JobConfig(model=cfg, train=TrainConfig(seed=3)), torch.device("cpu"))
        save_file({k: v.contiguous() for k, v in base.state_dict().items() if k != "freqs"},
                  os.path.join(src, "model.safetensors"))
    dist.barrier()
    state = load_file(os.path.join(src, "model.safetensors"))
    tokens = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(5))
    results = {}
    for layout, family, pcfg, from_file in LAYOUTS:
        cfg = configs[family]
        whole = build_model(cfg, device="meta")
        apply_svf(whole)
        # What one process holds: the SVF model (U and V^T together outweigh the matrix they replace).
        whole_bytes = sum(p.numel() * p.element_size() for p in model_tensors(whole).values())
        job = JobConfig(model=cfg, parallel=ParallelConfig(**pcfg), train=TrainConfig(seed=7),
                        finetune=FinetuneConfig(method="svf"), init={"from": src if from_file else ""})
        dims = ParallelDims.from_config(job.parallel, world)
        step = build_train_step(job, dims, build_mesh(dims, "cpu"), info)
        mine = tokens.chunk(dims.dp)[rank % dims.dp] if dims.dp > 1 else tokens
        loss = step.forward_backward([mine]).item()
        mods = svf_modules(step.raw_model)
        grads = {n: _full(m.z.grad) for n, m in mods.items()}
        trainable = sorted(n for n, p in step.model.named_parameters() if p.requires_grad)
        ref_loss, ref_grads = reference(cfg, state if from_file else None, 3 if from_file else 7, tokens, dims.dp)
        scale = max(g.abs().max().item() for g in ref_grads.values())
        results[layout] = {
            "loss": loss, "ref_loss": ref_loss, "n_z": len(grads), "n_ref": len(ref_grads),
            "z_grad_err": max((grads[n] - g).abs().max().item() for n, g in ref_grads.items()) / scale,
            "trainable_not_z": [n for n in trainable if not n.endswith(".z")],
            "names": step.svf_start.names, "matrices_read": step.svf_start.matrices_read,
            "cache_hit": step.svf_start.cache_hit,
            "held_bytes": sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local")
                              else t.numel() * t.element_size() for t in model_tensors(step.model).values()),
            "whole_bytes": whole_bytes}
        del step
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(main)
