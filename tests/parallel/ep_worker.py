"""torchrun worker for tests/parallel/test_expert_parallel.py: expert parallelism against one process.

    python -m torch.distributed.run --standalone --nproc-per-node {2,4} tests/parallel/ep_worker.py OUT

dp = WORLD, ep = 2 (2 ranks: dp_rep = 1; 4 ranks: dp_rep = 2). Per (case, backend): the loss and
every parameter's gradient of one step (float64) against one process running the same global
batch as WORLD accumulated micro-batches (the MoE auxiliary losses are per rank, as per
micro-batch in the reference), then STEPS AdamW steps' losses, the local expert shapes, the
dropped-assignment counts (capacity case), the clipped gradient norm; on 2 ranks also a DCP
checkpoint of the trained model, activation checkpointing, a float32 run through
`parallel.parallelize` and the input errors. Rank 0 writes OUT/result.json; pytest asserts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_cases as cases  # noqa: E402

from titanforge.models.common.moe import GroupedExperts, MoE, MoEConfig  # noqa: E402
from titanforge.models.common.moe_dispatch import expert_forward  # noqa: E402
from titanforge.models.config import ModelConfig  # noqa: E402
from titanforge.models.jamba.config import JambaConfig  # noqa: E402
from titanforge.models.registry import build_model, collect_aux_losses  # noqa: E402
from titanforge.parallel import (  # noqa: E402
    ParallelDims,
    build_mesh,
    clip_grad_norm,
    finish_grad_reduction,
    parallelize,
)
from titanforge.parallel.config import ParallelConfig  # noqa: E402
from titanforge.parallel.data_parallel import apply_activation_checkpointing, apply_ddp  # noqa: E402
from titanforge.parallel.expert_parallel import (  # noqa: E402
    apply_expert_parallel,
    ignore_experts_in_ddp,
    shard_experts_fsdp,
)
from titanforge.parallel.fsdp import apply_fsdp  # noqa: E402

EP = 2
CASES = ("jamba", "moe", "moe-capacity")


def case_config(name: str) -> ModelConfig:
    """jamba: fsdp_cases' tiny Jamba (Mamba + dense, attention + MoE). moe: every feed-forward an MoE
    (attention, Mamba), renormalised top-k. moe-capacity: moe with capacity factor 1 (drops)."""
    if name == "jamba":
        return cases.tiny_config("jamba")
    moe = MoEConfig(n_experts=4, top_k=2, topk_norm="renormalize", load_balance_coef=1e-2, z_loss_coef=1e-3,
                    capacity_factor=1.0 if name == "moe-capacity" else 0.0)
    return ModelConfig(family="jamba", vocab_size=cases.VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                       ffn_hidden=48, max_seq_len=64, tie_embeddings=True,
                       jamba=JambaConfig(layer_pattern="AE ME", d_state=8, chunk_size=16, moe=moe))


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(case_config(name)).to(dtype)


def loss_fn(model, inputs, targets) -> torch.Tensor:
    # In the logits' dtype (float64 here), unlike fsdp_cases.loss_fn which casts to float32.
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return loss + sum(collect_aux_losses(model).values())


def dropped(model) -> list[int]:
    return [int(m.metrics["dropped_tokens"]) for m in model.modules() if isinstance(m, MoE)]


def reference_step(model, world: int) -> tuple[float, list[list[int]]]:
    """The global batch as `world` accumulated micro-batches; the loss and each micro-batch's drops."""
    inputs, targets = cases.global_batch()
    total, drops = 0.0, []
    for r in range(world):
        loss = loss_fn(model, cases.shard(inputs, r, world), cases.shard(targets, r, world)) / world
        loss.backward()
        total += loss.item()
        drops.append(dropped(model))
    return total, drops


def parallel_model(name: str, backend: str, mesh, *, checkpointing: bool = False) -> torch.nn.Module:
    """The worker's own composition (float64: FSDP reduces in float64, unlike parallelize's float32)."""
    model = apply_expert_parallel(build(name), mesh["ep"])
    if checkpointing:
        apply_activation_checkpointing(model)
    if backend == "fsdp":
        shard_experts_fsdp(model, mesh["dp_rep"], mp_policy=MixedPrecisionPolicy())
        return apply_fsdp(model, mesh["dp"], reduce_dtype=None)
    ignore_experts_in_ddp(model, mesh["dp_rep"])
    return apply_ddp(model, torch.device("cpu"))


def global_mean(x: torch.Tensor) -> float:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x.item() / dist.get_world_size()


def full_grads(model) -> dict[str, torch.Tensor | None]:
    """Every parameter's full gradient by its plain-model name (collective: all ranks call it)."""
    out = {}
    for name, p in model.named_parameters():
        name = name.replace("module.", "", 1) if name.startswith("module.") else name
        name = name.replace("_checkpoint_wrapped_module.", "")
        g = p.grad
        # A copy: clipping later scales the gradients in place.
        out[name] = g.full_tensor() if isinstance(g, DTensor) else g.clone() if g is not None else None
    return out


def compare(grads: dict, ref: torch.nn.Module) -> dict:
    ref_params = dict(ref.named_parameters())
    worst, worst_name, missing = 0.0, "", []
    for name, g in grads.items():
        rg = ref_params[name].grad
        if (g is None) != (rg is None):
            missing.append(name)
        elif g is not None and (err := cases.rel_err(g, rg)) >= worst:
            worst, worst_name = err, name
    return {"grad_rel_err": worst, "worst_param": worst_name, "missing_grads": missing,
            "n_grads": len(grads), "names_match": sorted(grads) == sorted(ref_params)}


def expert_layout(model) -> list[dict]:
    out = []
    for name, p in model.named_parameters():
        if ".experts." in name:
            out.append({"name": name, "local": list(p.to_local().shape), "global": list(p.shape),
                        "mesh_dims": list(p.device_mesh.mesh_dim_names or ())})
    return out


def one_step(name: str, backend: str, mesh, **kwargs) -> tuple[dict, torch.nn.Module]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = parallel_model(name, backend, mesh, **kwargs)
    ref = build(name)
    ref_loss, ref_drops = reference_step(ref, world) if rank == 0 else (None, None)
    inputs, targets = cases.global_batch()
    loss = loss_fn(model, cases.shard(inputs, rank, world), cases.shard(targets, rank, world))
    loss.backward()
    finish_grad_reduction(model)
    drops = [None] * world
    dist.all_gather_object(drops, dropped(model))
    grads = full_grads(model)
    norm = clip_grad_norm(model, 1e9).item()
    clip_grad_norm(model, norm / 2)
    after = clip_grad_norm(model, 1e9).item()
    out = {"loss": global_mean(loss), "layout": expert_layout(model)}
    if rank == 0:
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9).item()
        out.update(compare(grads, ref), ref_loss=ref_loss, drops=drops, ref_drops=ref_drops, grad_norm=norm,
                   ref_grad_norm=ref_norm, grad_norm_after_clip=after)
    return out, model


def training(name: str, backend: str, mesh) -> tuple[dict, torch.nn.Module, torch.optim.Optimizer]:
    rank, world = dist.get_rank(), dist.get_world_size()
    ref_losses = None
    if rank == 0:
        ref = build(name)
        opt = cases.optimizer(ref)
        ref_losses = []
        for _ in range(cases.STEPS):
            opt.zero_grad()
            ref_losses.append(reference_step(ref, world)[0])
            opt.step()
    model = parallel_model(name, backend, mesh)
    opt = cases.optimizer(model)
    inputs, targets = cases.global_batch()
    losses = []
    for _ in range(cases.STEPS):
        opt.zero_grad()
        loss = loss_fn(model, cases.shard(inputs, rank, world), cases.shard(targets, rank, world))
        loss.backward()
        finish_grad_reduction(model)
        losses.append(global_mean(loss))
        opt.step()
    return {"losses": losses, "ref_losses": ref_losses}, model, opt


def save_checkpoint(out: Path, model, opt) -> None:
    """DCP checkpoint of the trained ep=2 model and optimizer, and rank 0's full copy to compare."""
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(out / "ep_ckpt"))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, opt, options=full)
    if dist.get_rank() == 0:
        torch.save({"model": model_sd, "optimizer": optim_sd}, out / "ep_full.pt")


def via_parallelize(backend: str, dims_mesh) -> dict:
    """float32 through the trainer's `parallelize` (FSDP reduces in float32 there)."""
    dims, mesh = dims_mesh[backend]
    rank, world = dist.get_rank(), dist.get_world_size()
    model = parallelize(build("jamba", dtype=torch.float32), "jamba", dims, mesh,
                        ParallelConfig(ep=EP, dp_backend=backend), torch.device("cpu"))
    ref = build("jamba", dtype=torch.float32)
    ref_loss = reference_step(ref, world)[0] if rank == 0 else None
    inputs, targets = cases.global_batch()
    loss = loss_fn(model, cases.shard(inputs, rank, world), cases.shard(targets, rank, world))
    loss.backward()
    finish_grad_reduction(model)
    grads = full_grads(model)
    out = {"loss": global_mean(loss)}
    if rank == 0:
        out.update(compare(grads, ref), ref_loss=ref_loss)
    return out


def zero_rows(mesh) -> dict:
    """The experts alone, with counts that leave rank 1's experts without rows (and rank 0 sending
    none to rank 1): outputs, input gradients and expert gradients (the ep mean, 1/ep in the graph)
    against `expert_forward` on the full weights."""
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = torch.tensor([3, 2, 0, 0])

    def data(r):
        g = torch.Generator().manual_seed(100 + r)
        return (torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True),
                torch.randn(5, 8, generator=g, dtype=torch.float64))

    torch.manual_seed(3)
    experts = GroupedExperts(4, 8, 16).double()
    experts.init_weights()
    full = [getattr(experts, w).detach().clone().requires_grad_() for w in ("w1", "w3", "w2")]
    holder = apply_expert_parallel(torch.nn.ModuleDict({"experts": experts}), mesh["ep"])
    x, gy = data(rank)
    y = holder["experts"](x, counts)
    (y * gy).sum().backward()
    ep_group = [r for r in range(world) if r // EP == rank // EP]
    errs = []
    for r in ep_group:
        xr, gyr = data(r)
        yr = expert_forward(xr, counts, *full)
        if r == rank:
            errs.append(cases.rel_err(y, yr))
            errs.append(cases.rel_err(x.grad, torch.autograd.grad((yr * gyr).sum(), xr, retain_graph=True)[0]))
        (yr * gyr).sum().div(EP).backward()
    errs += [cases.rel_err(getattr(experts, w).grad.full_tensor(), f.grad) for w, f in zip(("w1", "w3", "w2"), full)]
    worst = torch.tensor([max(errs)], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    # Rank 1 of each ep group owns experts 2 and 3, which get no rows: zero gradients, not None.
    idle = torch.tensor([float(rank % EP == 0 or experts.w1.grad.to_local().abs().sum() == 0)])
    dist.all_reduce(idle, op=dist.ReduceOp.MIN)
    return {"max_rel_err": worst.item(), "idle_grad_is_zero": bool(idle.item())}


def input_errors(mesh) -> list[str]:
    messages = []
    calls = (lambda: apply_expert_parallel(cases.build("llama"), mesh["ep"]),
             lambda: apply_expert_parallel(build("jamba"), "ep"),
             lambda: apply_expert_parallel(apply_expert_parallel(build("jamba"), mesh["ep"]), mesh["ep"]))
    for call in calls:
        try:
            call()
            messages.append("no error")
        except ValueError as e:
            messages.append(str(e))
    return messages


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = {b: ParallelDims.from_config(ParallelConfig(ep=EP, dp_backend=b), world) for b in ("ddp", "fsdp")}
    mesh = build_mesh(dims["ddp"], "cpu")
    dims_mesh = {b: (d, mesh) for b, d in dims.items()}
    result: dict = {"world_size": world, "dp_rep": mesh["dp_rep"].size(), "ep": mesh["ep"].size()}
    names = CASES if world == 2 else ("jamba", "moe-capacity")
    for name in names:
        for backend in ("ddp", "fsdp"):
            step, _ = one_step(name, backend, mesh)
            train, model, opt = training(name, backend, mesh) if name != "moe-capacity" else ({}, None, None)
            result[f"{name}/{backend}"] = {**step, **train}
            if world == 2 and (name, backend) == ("jamba", "ddp"):
                save_checkpoint(out, model, opt)
    if world == 2:
        result["jamba/ddp_checkpointing"] = one_step("jamba", "ddp", mesh, checkpointing=True)[0]
        result["jamba/fsdp_checkpointing"] = one_step("jamba", "fsdp", mesh, checkpointing=True)[0]
        for backend in ("ddp", "fsdp"):
            result[f"parallelize/{backend}"] = via_parallelize(backend, dims_mesh)
        result["errors"] = input_errors(mesh)
    result["zero_rows"] = zero_rows(mesh)
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    cases.worker_main(main)
