"""Config of the training task mixture: synthetic recall tasks mixed into the corpus stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class TaskMixConfig:
    # Task specs, `name[:key=value,...]`: passkey | niah_number | niah_word | mqar | babilong
    # (data/tasks/generators.py), e.g. ["passkey:digits=3", "mqar:pairs=8"]. Empty: corpus only.
    names: List[str] = field(default_factory=list)
    # Relative weight of each task (empty: equal).
    weights: List[float] = field(default_factory=list)
    # Fraction of training rows replaced by a task sample (the rest stay corpus text).
    fraction: float = 0.5
    # Put the loss on the answer tokens only for task rows (corpus rows keep every token).
    answer_only_loss: bool = True
