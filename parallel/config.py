"""Config of the parallel layout (degrees of each kind of parallelism)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    # Data-parallel degree; -1 means "whatever is left": world_size / (tp * pp * cp).
    dp: int = -1
    tp: int = 1
    pp: int = 1
    # Pipeline schedule: 1f1b | interleaved_1f1b | gpipe. The number of pipeline micro-batches
    # is the step's gradient-accumulation count, train.global_batch_size / (micro_batch_size * dp).
    pp_schedule: str = "1f1b"
    # Model chunks (virtual stages) per pipeline rank; interleaved_1f1b needs >= 2.
    pp_virtual_stages: int = 1
    # Context parallel: each sample's sequence split over cp ranks (parallel/context.py).
    cp: int = 1
    # How full causal attention (Llama, Jamba's attention layers) divides its queries under cp:
    # zigzag (load-balanced: rank r attends for half-pieces r and 2cp-1-r; needs T divisible by
    # 2 cp) | contiguous. Every other layer keeps the contiguous pieces; no effect on models
    # without full attention (Titans, TTT).
    cp_split: str = "zigzag"
    # Expert parallel; experts are spread over ep ranks taken from the dp ranks.
    ep: int = 1
    # Data-parallel engine: ddp | fsdp | deepspeed.
    dp_backend: str = "ddp"
    # ZeRO stage when dp_backend=deepspeed. ZeRO starts from the whole model on every rank (not a
    # sharded start); FSDP2 (dp_backend=fsdp) is the path for models larger than one device.
    zero_stage: int = 1
    # Process-group backend: auto (nccl on GPU, gloo on CPU) | gloo | nccl.
    backend: str = "auto"
