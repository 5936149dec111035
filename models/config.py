"""The model section of the job config: fields shared by every family, plus one section per family.

Each family owns its dataclass beside its code (`models/<family>/config.py`); this file only
composes them so that one typed schema covers every model. `family` picks the builder in
`models/registry.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from titanforge.kernels.dispatch import check_overrides
from titanforge.models.jamba.config import JambaConfig
from titanforge.models.titans.config import TitansConfig
from titanforge.models.ttt.config import TTTConfig

FAMILIES = ("llama", "titans", "ttt", "jamba")


@dataclass
class ModelConfig:
    # Which model family to build: llama | titans | ttt | jamba.
    family: str = "llama"
    # Embedding rows. Must be >= the tokenizer's vocabulary (checked against the data manifest).
    vocab_size: int = 50304
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # Key/value heads for grouped-query attention; None means n_heads (plain multi-head).
    n_kv_heads: Optional[int] = None
    # SwiGLU hidden width; 0 derives Llama's rule: 8/3 * d_model rounded up to `multiple_of`.
    ffn_hidden: int = 0
    multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    # Llama: sliding-window attention, a query sees itself and the attention_window - 1 tokens
    # before it (Mistral-style); 0 = full causal attention.
    attention_window: int = 0
    # Standard deviation of the normal init of linear and embedding weights.
    init_std: float = 0.02
    titans: TitansConfig = field(default_factory=TitansConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    jamba: JambaConfig = field(default_factory=JambaConfig)
    # Debugging: force an op's kernel, {op: auto|triton|native|torch} ('*' for every op), e.g.
    # model.kernels.rms_norm=torch; the default rule is CUDA -> Triton, CPU -> C loop (kernels/dispatch.py).
    kernels: Dict[str, str] = field(default_factory=dict)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(8 * self.d_model / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> list[str]:
        """Return human-readable problems (empty when the config is consistent)."""
        errs = []
        if self.family not in FAMILIES:
            errs.append(f"model.family={self.family!r} is not one of {FAMILIES}")
        if self.d_model % self.n_heads:
            errs.append(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                        f"pick n_heads among {[h for h in range(1, 65) if self.d_model % h == 0][-6:]}")
        if self.n_heads % self.kv_heads:
            errs.append(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.kv_heads}")
        try:  # the names only; build_model applies them
            check_overrides(self.kernels)
        except ValueError as e:
            errs.append(str(e))
        if self.attention_window < 0:
            errs.append(f"model.attention_window={self.attention_window} must be >= 0 (0: full causal attention)")
        elif self.attention_window and self.family != "llama":
            errs.append(f"model.attention_window applies to family llama only (titans has model.titans.window); "
                        f"set model.attention_window=0")
        # Each family checks its own section; only the chosen family's problems stop a run.
        section = getattr(self, self.family, None)
        if section is not None and hasattr(section, "validate"):
            errs += section.validate()
        return errs
