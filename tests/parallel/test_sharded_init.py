"""Sharded start (parallel/init.py): every layout starts from the single-process weights, and a
model larger than a rank's memory budget starts and trains under FSDP2.

Launches: one 4-rank run of tests/parallel/init_worker.py (every family and variant under fsdp,
tp (dp x tp), pp (pp x tp, and pp with DDP; the pipeline still cuts its stages from a full model
per rank, trainer/pipeline_step.py), ep (with FSDP2 and with DDP): exact equality with
`build_plain_model`), and tests/parallel/memory_worker.py on 4 ranks and on 1 rank under the same
enforced budget (RLIMIT_DATA).

Memory measurement: glibc raises its mmap threshold as large blocks are freed, after which freed
all-gather buffers stay in the heap and RSS climbs to ~1.4 GB per rank on this model without any
live tensor growing; the launches fix the threshold (MALLOC_MMAP_THRESHOLD_) so RSS follows live
memory. On a GPU the caching allocator plays that role.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titanforge.models.config import ModelConfig
from titanforge.parallel.init import ROW_BLOCK, init_model_weights, unit_seed
from titanforge.models.registry import build_model

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow
# The memory worker's budget per rank, MB over what the process holds before the model is built.
BUDGET_MB = 265


def _torchrun(nproc: int, script: str, *args: str, mmap_threshold: int = 131072) -> None:
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(HERE / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}
    proc = subprocess.run(cmd, cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def test_unit_seeds_and_row_blocks_are_the_layout_free_part():
    """In one process: seeds depend on (seed, name) only; another seed gives other weights; a
    model whose vocabulary is not a multiple of ROW_BLOCK is filled completely."""
    assert unit_seed(0, "layers.0") == unit_seed(0, "layers.0") != unit_seed(1, "layers.0")
    assert unit_seed(0, "layers.0") != unit_seed(0, "layers.1")
    cfg = ModelConfig(family="llama", vocab_size=ROW_BLOCK + 37, d_model=16, n_layers=2, n_heads=2, ffn_hidden=24,
                      max_seq_len=16, tie_embeddings=False)
    models = []
    for seed in (5, 5, 6):
        m = build_model(cfg, device="meta").to_empty(device="cpu")
        for p in m.parameters():
            p.data.fill_(float("nan"))
        init_model_weights(m, cfg, seed)
        models.append(dict(m.named_parameters()))
    for name, p in models[0].items():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, models[1][name]), name
        if p.ndim == 2:
            assert not torch.equal(p, models[2][name]), name
    emb = models[0]["tok_embeddings.weight"]
    assert abs(emb.std().item() - cfg.init_std) < 0.1 * cfg.init_std
    # Blocks are independent draws, not one block repeated.
    assert not torch.equal(emb[:37], emb[ROW_BLOCK:])


@pytest.fixture(scope="module")
def init_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sharded_init") / "init.json"
    _torchrun(4, "init_worker.py", str(out))
    return json.loads(out.read_text())


def test_sharded_start_equals_single_process_start(init_results):
    combos = {(r["layout"], r["model"]) for r in init_results}
    assert {layout for layout, _ in combos} == {"fsdp", "tp", "pp", "pp_ddp", "ep", "ep_ddp"}
    assert {m for _, m in combos} >= {"llama", "titans", "titans-mag", "titans-mal", "titans-lmm", "ttt", "ttt-mlp",
                                      "jamba"}
    for r in init_results:
        where = f"{r['layout']} {r['model']} rank {r['rank']}"
        assert r["n_held"] > 0, where
        assert r["mismatched"] == [] and r["max_abs_err"] == 0.0, (where, r)
        assert r["uncovered"] == [], (where, r)
        if r["layout"] in ("fsdp", "tp", "ep", "ep_ddp"):
            assert r["n_held"] == r["n_tensors"], where
        else:
            assert r["n_held"] < r["n_tensors"], where  # a pipeline rank holds its stage only


@pytest.fixture(scope="module")
def memory_runs(tmp_path_factory) -> dict[int, list[dict]]:
    out = tmp_path_factory.mktemp("sharded_mem")
    runs = {}
    for n in (4, 1):
        _torchrun(n, "memory_worker.py", str(BUDGET_MB), str(out / f"mem{n}.json"))
        runs[n] = json.loads((out / f"mem{n}.json").read_text())
    return runs


def test_model_larger_than_the_budget_starts_and_trains_under_fsdp2(memory_runs):
    four, one = memory_runs[4], memory_runs[1]
    assert four[0]["weights_mb"] > BUDGET_MB * 1.08
    for r in four:
        assert r["stage"] == "done", r
        assert r["peak_mb"] < BUDGET_MB, r
        # A quarter of the weights and of the gradients at least: the peak measures something.
        assert r["peak_mb"] > r["weights_mb"] / 2, r
        assert r["losses"][1] < r["losses"][0], r
    # The same model, budget and code in one process: it cannot even allocate its weights.
    assert one[0]["stage"] == "start" and "allocate" in one[0]["error"], one
