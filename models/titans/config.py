"""Config of the Titans family (filled in by issue 3)."""

from dataclasses import dataclass


@dataclass
class TitansConfig:
    # Which Titans variant: mac | mag | mal | lmm.
    variant: str = "mac"
