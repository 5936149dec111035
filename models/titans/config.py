"""Config of the Titans family (Behrouz et al. 2025): variant, memory shape, chunking, windows.

Width, heads and depth come from the shared ModelConfig (d_model, n_heads, n_layers); memory
heads equal attention heads and the memory head dim is d_model / n_heads.
"""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS = ("mac", "mag", "mal", "lmm")


@dataclass
class TitansConfig:
    # Which Titans variant: mac (memory as context) | mag (as gate) | mal (as layer) | lmm (memory only).
    variant: str = "mac"
    # L_M, layers of the memory MLP; 1 is the linear memory of the paper's ablation.
    memory_depth: int = 2
    # Hidden width of a deep memory as a multiple of the head dim (unused when memory_depth = 1).
    memory_expansion: int = 2
    # Activation between memory layers: silu | gelu.
    memory_activation: str = "silu"
    # b, tokens per parallel chunk of the memory update (gradients taken at the chunk's start).
    chunk_size: int = 16
    # Tokens sharing one value of theta/eta/alpha (1 = per token, as in the paper); divides chunk_size.
    gate_granularity: int = 1
    # theta_t = theta_max * sigmoid(.), the largest inner step size. A chunk applies b gradients
    # taken at one point, amplified by momentum ~ 1/(1 - eta): keep theta_max * b / (1 - eta) small.
    theta_max: float = 0.1
    # Per-token clip of the memory's inner gradient norm (all layers, per head): each token's
    # gradient is scaled by min(1, clip / ||grad||) before the momentum (titans-pytorch's
    # max_grad_norm). Keeps the memory finite for any gates and inputs (kernels/titans_memory/README.md);
    # 0 or null turns it off (the presets diverged to NaN within 10 steps without it).
    inner_grad_clip: float | None = 1.0
    # MAC: tokens per segment (attention context is [persistent | retrieved | segment]).
    segment_len: int = 64
    # MAG / MAL: sliding-window size (a query sees itself and window - 1 earlier tokens).
    window: int = 64
    # N_p, learnable persistent-memory tokens visible to every attention query.
    n_persistent: int = 4
    # Kernel width of the depthwise causal convolutions after the q/k/v projections.
    conv_kernel: int = 4
    # Run the memory's chunk chain (forward and backward) through torch.compile. Opt-in: on the
    # 2-core CPU host the first step compiled for 50-110 s, then the chain ran ~1.2x faster and
    # the MAC step 1-7% (bench/results/titans.json, docs/design.md); off in tests and CI.
    compile_memory: bool = False

    def validate(self) -> list[str]:
        errs = []
        if self.variant not in VARIANTS:
            errs.append(f"model.titans.variant={self.variant!r} must be one of {VARIANTS}")
        if self.memory_depth < 1:
            errs.append(f"model.titans.memory_depth={self.memory_depth} must be >= 1 (1 = linear memory)")
        if self.memory_expansion < 1:
            errs.append(f"model.titans.memory_expansion={self.memory_expansion} must be >= 1")
        if self.memory_activation not in ("silu", "gelu"):
            errs.append(f"model.titans.memory_activation={self.memory_activation!r} must be silu | gelu")
        if self.chunk_size < 1:
            errs.append(f"model.titans.chunk_size={self.chunk_size} must be >= 1")
        elif self.gate_granularity < 1 or self.chunk_size % self.gate_granularity:
            errs.append(f"model.titans.gate_granularity={self.gate_granularity} must divide "
                        f"model.titans.chunk_size={self.chunk_size} (pooled gates may only look "
                        f"within a chunk, or the memory would see the future)")
        if self.variant == "mac" and self.chunk_size >= 1 and (self.segment_len < 1 or self.segment_len % self.chunk_size):
            errs.append(f"model.titans.segment_len={self.segment_len} must be a positive multiple of "
                        f"model.titans.chunk_size={self.chunk_size} so memory chunks line up across segments")
        if self.window < 1:
            errs.append(f"model.titans.window={self.window} must be >= 1")
        if self.n_persistent < 0:
            errs.append(f"model.titans.n_persistent={self.n_persistent} must be >= 0")
        if self.conv_kernel < 1:
            errs.append(f"model.titans.conv_kernel={self.conv_kernel} must be >= 1")
        if self.inner_grad_clip is not None and not self.inner_grad_clip >= 0:
            errs.append(f"model.titans.inner_grad_clip={self.inner_grad_clip} must be > 0, or 0 / null to turn it off")
        if self.theta_max <= 0:
            errs.append(f"model.titans.theta_max={self.theta_max} must be > 0")
        return errs
