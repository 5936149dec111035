"""DeepSpeed ZeRO stages 1/2/3, the alternative data-parallel backend (`parallel.dp_backend=deepspeed`).

ZeRO (Rajbhandari et al. 2020) partitions over the data-parallel ranks: stage 1 the optimizer
state, stage 2 also the gradients, stage 3 also the parameters (what FSDP2 does; parallel/fsdp.py
is the default). DeepSpeed 0.19.8 runs all three on CPU with gloo.

Choices, and where this differs from a stock DeepSpeed setup:
- The optimizer is the client's own `torch.optim.AdamW` (the trainer's param groups), never a
  DeepSpeed-config optimizer: FusedAdam / cpu_adam compile C++ for minutes on first use.
- DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op (`deepspeed_shm_comm`) the
  first time its comm backend starts: 65-200 s on these machines. There is no environment switch
  for it in 0.19.8; `deepspeed.comm.torch.build_shm_op` builds it only when
  `deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]` is true, so unless `cpu_shm_comm=True`
  that entry is set false before DeepSpeed starts and every collective goes through
  torch.distributed (gloo), the same path DeepSpeed takes where the op cannot be built. GPU
  accelerators never use this op.
- `engine.backward(loss)` divides the loss by `grad_accum` itself: pass each micro-batch's mean loss.
- Checkpoints use DeepSpeed's own format (`engine.save_checkpoint`): DCP's get_state_dict does not
  see ZeRO partitions. Changing the world size would need DeepSpeed's universal checkpoint; the
  trainer rejects it instead (trainer/checkpoint.py).
"""

from __future__ import annotations

import torch
from torch import nn

ZERO_STAGES = (0, 1, 2, 3)
SHM_OP = "deepspeed_shm_comm"


def deepspeed_config(*, zero_stage: int, micro_batch_size: int, grad_accum: int = 1, clip: float = 0.0,
                     dtype: torch.dtype = torch.float32, offload_optimizer: bool = False) -> dict:
    """The DeepSpeed config dict for these settings (train_batch_size is derived by DeepSpeed)."""
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage={zero_stage} must be one of {ZERO_STAGES} (0 = plain data parallel)")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1 (sequences per rank per micro-step)")
    if grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum} must be >= 1 (1 = no accumulation)")
    if clip < 0:
        raise ValueError(f"clip={clip} must be >= 0 (0 = no gradient clipping)")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype} must be torch.float32, torch.bfloat16 or torch.float16")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs zero_stage >= 1 (ZeRO-Offload partitions the optimizer state)")
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.accelerator.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        # A client torch optimizer with offload: DeepSpeed otherwise insists on its compiled cpu_adam.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return config


def build_deepspeed_engine(model: nn.Module, optimizer: torch.optim.Optimizer, *, zero_stage: int,
                           micro_batch_size: int, grad_accum: int = 1, clip: float = 0.0,
                           dtype: torch.dtype = torch.float32, offload_optimizer: bool = False,
                           lr_scheduler=None, cpu_shm_comm: bool = False):
    """Wrap `model` and the client `optimizer` (built over model.parameters()) in a ZeRO engine.

    Call after torch.distributed is initialised (the trainer does it; DeepSpeed reuses the group).
    Training step: `loss = loss_fn(engine(tokens))`, `engine.backward(loss)`, `engine.step()`
    (the optimizer steps, with clipping, only every `grad_accum` micro-steps). `engine.module` is
    the original model. Returns a `deepspeed.DeepSpeedEngine`.
    """
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("parallel.dp_backend=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'") from e
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer built over the model's parameters, got "
                         f"{type(optimizer).__name__}; DeepSpeed-config optimizers are not used (they compile)")
    config = deepspeed_config(zero_stage=zero_stage, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                              clip=clip, dtype=dtype, offload_optimizer=offload_optimizer)
    if not cpu_shm_comm:
        # The one gate DeepSpeed consults before compiling its CPU shared-memory op (module docstring).
        deepspeed.ops.__compatible_ops__[SHM_OP] = False
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           lr_scheduler=lr_scheduler)
    return engine


def full_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The full (all-reduced, unpartitioned) gradient of one parameter after backward, before step."""
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param)
