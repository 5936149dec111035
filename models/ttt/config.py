"""Config of the TTT family (filled in by issue 4)."""

from dataclasses import dataclass


@dataclass
class TTTConfig:
    # Inner model: linear | mlp.
    inner: str = "linear"
