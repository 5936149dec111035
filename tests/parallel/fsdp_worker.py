"""torchrun worker for tests/parallel/test_fsdp.py: FSDP2 at dp=WORLD against one process.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/parallel/fsdp_worker.py OUT FAMILY... [VARIANT...]

One launch covers every check (a launch costs seconds). Per family: the loss and every gradient
of one step, then STEPS AdamW steps, then initialisation on the meta device after sharding
(VARIANTs such as titans-mag: the first step only). For llama also mixed precision, CPU offload,
no resharding, accumulation under no_gradient_sync, the DCP round trips with a single process,
and the input errors. Rank 0 computes the single-process reference and writes the numbers to
OUT/result.json; the pytest file asserts.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_cases as cases  # noqa: E402

from titanforge.models.registry import build_model  # noqa: E402
from titanforge.parallel.data_parallel import apply_activation_checkpointing  # noqa: E402
from titanforge.parallel.fsdp import apply_fsdp, no_gradient_sync  # noqa: E402
from titanforge.parallel.grad_norm import clip_grad_norm_  # noqa: E402


def global_mean(x: torch.Tensor) -> float:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x.item() / dist.get_world_size()


def grad_errors(model, ref, accum: int = 1) -> dict:
    """One step of the global batch under FSDP vs the reference: loss and per-parameter errors.

    With accum > 1 each rank accumulates its shard as `accum` micro-batches, reducing only the last.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs, targets = cases.global_batch()
    ref_loss = cases.reference_step(ref, inputs, targets, world * accum) if rank == 0 else None
    micro = zip(cases.shard(inputs, rank, world).chunk(accum), cases.shard(targets, rank, world).chunk(accum))
    loss = torch.zeros(())
    for i, (x, y) in enumerate(micro):
        with no_gradient_sync(model) if i < accum - 1 else contextlib.nullcontext():
            micro_loss = cases.loss_fn(model, x, y) / accum
            micro_loss.backward()
        loss += micro_loss.detach()
        if i == 0 and accum > 1:
            # Nothing reduced yet: sharded gradients appear only with the last micro-batch's reduce-scatter.
            reduced_early = any(p.grad is not None for p in model.parameters())
    loss = global_mean(loss)
    ref_params = dict(ref.named_parameters())
    worst, worst_name, missing = 0.0, "", []
    for name, p in model.named_parameters():
        # full_tensor() is a collective: every rank gathers every gradient in the same order.
        grad = p.grad.full_tensor() if p.grad is not None else None
        if rank:
            continue
        # Activation checkpointing inserts a wrapper into the names; the parameters are the same.
        ref_grad = ref_params[name.replace("_checkpoint_wrapped_module.", "")].grad
        if (grad is None) != (ref_grad is None):
            missing.append(name)
        elif grad is not None and (err := cases.rel_err(grad, ref_grad)) >= worst:
            worst, worst_name = err, name
    return {"loss": loss, "ref_loss": ref_loss, "grad_rel_err": worst, "worst_param": worst_name,
            "missing_grads": missing, "n_params": len(ref_params),
            "reduced_early": reduced_early if accum > 1 else None}


def training(family: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    ref_losses = cases.reference_training(cases.build(family), world) if rank == 0 else None
    model = apply_fsdp(cases.build(family), mesh)
    opt = cases.optimizer(model)
    inputs, targets = cases.global_batch()
    losses = []
    for _ in range(cases.STEPS):
        opt.zero_grad()
        loss = cases.loss_fn(model, cases.shard(inputs, rank, world), cases.shard(targets, rank, world))
        loss.backward()
        losses.append(global_mean(loss))
        opt.step()
    return {"losses": losses, "ref_losses": ref_losses}, model, opt


def checkpoint_round_trips(out: Path, model, opt) -> dict:
    """Save the trained dp=WORLD llama with DCP; load the single-process checkpoint into FSDP."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(out / "fsdp_ckpt"))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, opt, options=full)
    if rank == 0:
        torch.save({"model": model_sd, "optimizer": optim_sd}, out / "fsdp_full.pt")

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    # Different seed: the loaded values must come from the checkpoint, not from the same init.
    fresh = apply_fsdp(cases.build("llama", seed=123), mesh)
    fresh_opt = cases.optimizer(fresh)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(out / "single_ckpt"))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt, options=full)
    inputs, targets = cases.global_batch()
    fresh_opt.zero_grad()
    loss = cases.loss_fn(fresh, cases.shard(inputs, rank, world), cases.shard(targets, rank, world))
    loss.backward()
    clip_norm = clip_grad_norm_(fresh, 1e9).item()
    # Clipping to half the norm must leave gradients whose global norm is that half.
    clip_grad_norm_(fresh, clip_norm / 2)
    after_clip = clip_grad_norm_(fresh, 1e9).item()
    next_loss = global_mean(loss)
    if rank:
        return {}
    expected = torch.load(out / "single_full.pt", weights_only=False)
    got = cases.flat_state({"model": model_sd, "optimizer": optim_sd})
    want = cases.flat_state(expected)
    diffs = {k: (got[k].double() - want[k].double()).abs().max().item() for k in want if k in got}
    return {"load_keys_missing": sorted(set(want) - set(got)), "load_keys_extra": sorted(set(got) - set(want)),
            "load_max_abs_diff": max(diffs.values()), "n_keys": len(want), "next_loss": next_loss,
            "grad_norm": clip_norm, "grad_norm_after_clip": after_clip}


def meta_init(family: str) -> dict:
    """Build on meta, shard, materialise, init_weights on the shards (the trainer's path).

    Values differ from a single-process init (each shard draws its own random numbers), so each
    parameter is held to the reference's statistics: constants (std 0) exactly, random tensors a std
    within a factor 1.5. The first loss must be near ln(V), as for any small init.
    """
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    try:
        model = apply_fsdp(build_model(cases.tiny_config(family), device="meta"), mesh)
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights()
    except Exception as e:  # reported, so one family's failure does not hide the others' results
        return {"error": f"{type(e).__name__}: {e}"}
    ref = dict(cases.build(family).named_parameters())
    bad = []
    for name, p in model.named_parameters():
        full, want = p.full_tensor().detach(), ref[name].detach()
        if not torch.isfinite(full).all():
            bad.append(f"{name}: not finite")
        elif want.numel() > 1 and want.std() == 0:
            if not torch.equal(full, want):
                bad.append(f"{name}: constant init differs")
        elif want.numel() > 16 and not 1 / 1.5 < (full.std() / want.std()).item() < 1.5:
            bad.append(f"{name}: std {full.std():.3g} vs {want.std():.3g}")
    inputs, targets = cases.global_batch()
    loss = cases.loss_fn(model, cases.shard(inputs, dist.get_rank(), dist.get_world_size()),
                         cases.shard(targets, dist.get_rank(), dist.get_world_size()))
    return {"bad_params": bad, "loss": global_mean(loss)}


def input_errors() -> list[str]:
    """The messages for a model without `layers`, a non-mesh argument, no_gradient_sync on a plain model."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    messages = []
    calls = (lambda: apply_fsdp(torch.nn.Linear(3, 3), mesh), lambda: apply_fsdp(cases.build("llama"), "dp"),
             lambda: no_gradient_sync(torch.nn.Linear(3, 3)).__enter__())
    for call in calls:
        try:
            call()
            messages.append("no error")
        except ValueError as e:
            messages.append(str(e))
    return messages


def main() -> None:
    out, families = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    result: dict = {"world_size": dist.get_world_size()}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    for family in families:
        model, ref = cases.build(family), cases.build(family)
        step = grad_errors(apply_fsdp(model, mesh), ref)
        if family in cases.VARIANTS:
            result[family] = step
            continue
        train, model, opt = training(family)
        result[family] = {**step, **train, "meta_init": meta_init(family)}
        if family == "llama":
            variants = {"bf16": dict(param_dtype=torch.bfloat16), "cpu_offload": dict(cpu_offload=True),
                        "no_reshard": dict(reshard_after_forward=False)}
            for name, kwargs in variants.items():
                result[f"llama_{name}"] = grad_errors(apply_fsdp(cases.build(family), mesh, **kwargs),
                                                      cases.build(family))
            result["llama_accum"] = grad_errors(apply_fsdp(cases.build(family), mesh), cases.build(family), accum=2)
            # The trainer's order: activation checkpointing per block, then FSDP over the wrapped blocks.
            checkpointed = apply_fsdp(apply_activation_checkpointing(cases.build(family)), mesh)
            result["llama_checkpointing"] = grad_errors(checkpointed, cases.build(family))
            result["dcp"] = checkpoint_round_trips(out, model, opt)
            result["errors"] = input_errors()
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    cases.worker_main(main)
