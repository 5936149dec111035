"""torchrun worker (4 ranks) for test_fsdp.py: FSDP2 over the dp dim of a dp=2 x tp=2 mesh.

    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/parallel/fsdp_2d_worker.py OUT

Tensor parallelism here is a minimal Megatron feed-forward split (w1, w3 column-wise, w2
row-wise) written with torch's own `parallelize_module`, only to show that `apply_fsdp` composes
with a TP-sharded model (2-D DTensor parameters); the project's TP plans live in
parallel/tensor_parallel.py. Rank 0 writes OUT/result.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_cases as cases  # noqa: E402

from titanforge.parallel.fsdp import apply_fsdp  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    result: dict = {}
    try:
        apply_fsdp(cases.build("llama"), mesh)
    except ValueError as e:
        result["mesh_error"] = str(e)

    model, ref = cases.build("llama"), cases.build("llama")
    plan = {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()}
    for block in model.layers.values():
        parallelize_module(block.feed_forward, mesh["tp"], plan)
    apply_fsdp(model, mesh["dp"])
    result["dtensor_mesh_dims"] = list(model.layers["0"].feed_forward.w1.weight.device_mesh.mesh_dim_names)

    dp_rank, dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
    inputs, targets = cases.global_batch()
    ref_loss = cases.reference_step(ref, inputs, targets, dp) if rank == 0 else None
    loss = cases.loss_fn(model, cases.shard(inputs, dp_rank, dp), cases.shard(targets, dp_rank, dp))
    loss.backward()
    # Both tp ranks of a dp group hold the same loss, so the mean over all ranks is the dp mean.
    total = loss.detach().clone()
    dist.all_reduce(total)
    worst, worst_name, missing = 0.0, "", []
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if p.grad is not None else None
        if rank:
            continue
        if (grad is None) != (ref_params[name].grad is None):
            missing.append(name)
        elif grad is not None and (err := cases.rel_err(grad, ref_params[name].grad)) >= worst:
            worst, worst_name = err, name
    if rank == 0:
        result.update(loss=total.item() / dist.get_world_size(), ref_loss=ref_loss, grad_rel_err=worst,
                      worst_param=worst_name, missing_grads=missing)
        (out / "result.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    cases.worker_main(main)
