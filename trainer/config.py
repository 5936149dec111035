"""Config of the training loop: optimizer and schedule, checkpoints, logging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class OptimConfig:
    lr: float = 3e-4
    # The schedule ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # cosine (warmup then cosine decay) | wsd (warmup, stable, decay) | constant (after warmup).
    schedule: str = "cosine"
    warmup_steps: int = 10
    # WSD: the final fraction of steps over which lr decays linearly to the minimum.
    decay_fraction: float = 0.2
    # Clip the global gradient norm to this value; 0 disables clipping.
    grad_clip: float = 1.0


@dataclass
class CheckpointConfig:
    enabled: bool = True
    # Save every this many optimizer steps (and at the end and on preemption).
    every: int = 50
    # Keep the newest N complete checkpoints; older ones are deleted after a save completes.
    keep_last: int = 3
    # Write in a background thread with torch.distributed.checkpoint.async_save.
    async_save: bool = False
    # auto: resume from the newest complete checkpoint in output_dir, if any | never.
    resume: str = "auto"
    # With checkpoints in output_dir of which none verifies, a run stops (exit 2) rather than start
    # from step 0; true starts afresh anyway (the unusable checkpoints stay on disk).
    allow_fresh_start: bool = False
    # Resuming with other train.steps or optim schedule values (lr, schedule, warmup_steps,
    # min_lr_ratio, decay_fraction) stops with the differences listed; true applies the new
    # schedule from the resumed step on and prints what changed.
    allow_schedule_change: bool = False
    # Take over output_dir's run.lock even though its holder looks alive (trainer/runlock.py).
    break_lock: bool = False


@dataclass
class WandbConfig:
    # offline (default; `wandb sync` later) | online | disabled.
    mode: str = "offline"
    project: str = "titanforge"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    steps: int = 100
    # Sequences per optimizer step, over all data-parallel ranks.
    global_batch_size: int = 8
    # Sequences per forward pass on one rank; accumulation = global / (micro * dp).
    micro_batch_size: int = 4
    seed: int = 0
    # auto (cuda if available, else cpu) | cpu | cuda.
    device: str = "auto"
    # Autocast dtype: float32 (no autocast) | bfloat16 (where the device supports it).
    dtype: str = "float32"
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = 1
    # Validation every this many steps (0 disables) over val_batches micro-batches per rank.
    val_every: int = 50
    val_batches: int = 4
    # Skip steps whose loss or gradient is not finite; stop after this many in a row.
    max_consecutive_nonfinite: int = 3
    # Peak FLOP/s per device for MFU, in TFLOP/s; 0 = look up the GPU (bf16 dense) or derive the
    # CPU rank's peak: its threads x FLOP/cycle (vector width, FMA, AMX for bf16) x clock
    # (trainer/perf.py; rank 0's [cpu] line shows the derivation).
    peak_tflops: float = 0.0
    # Keep freed host memory in the process (glibc mallopt) so activations are not page-faulted
    # in again every step; a large win for CPU training, harmless on GPU.
    keep_freed_memory: bool = True
    # Flush denormal floats to zero on CPU (FTZ/DAZ) for the run. Gradients carried back through
    # many decays (Titans' memory, at T >= 2k) reach 1e-38 and below, where every CPU op on them
    # runs ~30x slower: Titans MAC at T=2k took 10.0 s per step with them, 5.5 s flushed.
    # Values that small are zero for any training purpose (bfloat16 has the same exponent range).
    flush_denormal: bool = True
    # The LM head and its loss as one chunked op that never forms the [tokens, vocab] logits
    # (kernels/loss; Triton on CUDA). Plain layout only (tp = pp = 1).
    fused_cross_entropy: bool = False


@dataclass
class EvalConfig:
    # Run the long-context suites every this many steps (0: never), on the data-parallel ranks.
    every: int = 0
    # Task specs (data/tasks/generators.py), e.g. ["passkey", "mqar:pairs=8"].
    suites: List[str] = field(default_factory=list)
    # Sequence lengths in tokens; empty: the training sequence length.
    lengths: List[int] = field(default_factory=list)
    # Needle depths per length, evenly spaced from 0 to 1.
    depths: int = 5
    # Samples per (length, depth) cell.
    samples: int = 8
    # Sequences per forward pass.
    batch_size: int = 4
    # Seed of the generated samples (the same samples at every evaluation).
    seed: int = 1234


@dataclass
class FinetuneConfig:
    """Parameter-efficient fine-tuning of the (pretrained: init.from) model.

    svf: Transformer²'s Singular Value Fine-tuning (models/svf.py): every matrix matching `targets`
    becomes U diag(s * z) V^T and only the z-vectors train. lora: the LoRA baseline
    (models/lora.py) on the same matrices. none: the whole model trains."""
    method: str = "none"
    # fnmatch patterns over nn.Linear names (default: every matrix inside the blocks).
    targets: List[str] = field(default_factory=lambda: ["layers.*"])
    exclude: List[str] = field(default_factory=list)
    # svf: start from these z-vectors (a `titanforge svf export` file) instead of z = 1.
    z_from: str = ""
    lora_rank: int = 4
    lora_alpha: float = 8.0
