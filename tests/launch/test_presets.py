"""The paper-size presets in configs/: each loads, validates for its intended 8-GPU layout, and
its parameter count (built on meta: nothing allocated) matches the size in its name.

Tolerance: 10% of the nominal size. The nominal size is the number in the file name (340m,
1.3b; for Jamba "a1b" = 1B active parameters per token), except where the name is the model's
own published name: Meta calls the 1.24B Llama 3.2 model "1B", so llama-1b is held to 1.24B.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from titanforge.launch.config import load_config, validate
from titanforge.launch.plan import param_counts

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = ["titans-mac-340m", "titans-mag-340m", "titans-mal-340m", "titans-mac-760m", "titans-mag-760m",
           "titans-mal-760m", "ttt-linear-760m", "ttt-mlp-760m", "ttt-linear-1.3b", "ttt-mlp-1.3b",
           "jamba-a1b-16e", "llama-1b", "llama-8b"]
PUBLISHED = {"llama-1b": 1.24e9}
TOLERANCE = 0.10


def nominal(name: str) -> tuple[float, bool]:
    """(size in parameters, whether it counts active parameters) from the preset's name."""
    if name in PUBLISHED:
        return PUBLISHED[name], False
    m = re.search(r"(a?)(\d+(?:\.\d+)?)([mb])", name.split("-", 1)[1])
    return float(m.group(2)) * (1e6 if m.group(3) == "m" else 1e9), m.group(1) == "a"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_size_matches_its_name(name):
    job = load_config(CONFIGS / f"{name}.yaml")
    validate(job, world_size=8)  # the layout it is meant for: 8 GPUs
    total, active = param_counts(job.model)
    size, is_active = nominal(name)
    count = active if is_active else total
    assert abs(count / size - 1) <= TOLERANCE, f"{name}: {count / 1e6:.0f}M parameters vs {size / 1e6:.0f}M"
    if is_active:
        assert total > 2 * active  # a mixture of experts: most parameters idle per token


def test_every_sized_preset_is_checked():
    sized = {p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.endswith("-tiny")}
    assert sized == set(PRESETS)
