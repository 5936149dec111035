"""Config of the Jamba hybrid family (filled in by issue 5)."""

from dataclasses import dataclass


@dataclass
class JambaConfig:
    # Mixer per layer within the repeating block: M = Mamba, A = attention.
    layer_pattern: str = "MMMMAMMM"
