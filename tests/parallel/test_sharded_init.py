"""Sharded start (parallel/init.py): every layout starts from the single-process weights, and a
model larger than a rank's memory budget starts and trains under FSDP2.

The 4-rank launch shared with test_plan.py (tests/parallel/start_worker.py, conftest.py): the
memory-budget runs of memory_worker.py (4 ranks under FSDP2; the one-process start on rank 0 under
the same enforced budget, RLIMIT_DATA), then init_worker.py's cases: every family and variant
under fsdp, tp (dp x tp) and pp x tp; pp x dp (FSDP2) for the four families; pp x dp (DDP) for
Llama and Jamba; ep (with FSDP2 and with DDP) for Jamba. Checked: exact equality with
`build_plain_model`, only the rank's shards ever allocated, and (pp x tp) gradients placed like
their parameters after a backward.

Memory measurement: glibc raises its mmap threshold as large blocks are freed, after which freed
all-gather buffers stay in the heap and RSS climbs to ~1.4 GB per rank on this model without any
live tensor growing; the launch fixes the threshold (MALLOC_MMAP_THRESHOLD_, 16 KiB) so RSS
follows live memory. On a GPU the caching allocator plays that role.
"""

from __future__ import annotations

import pytest
import torch

from titanforge.models.config import ModelConfig
from titanforge.parallel.init import ROW_BLOCK, init_model_weights, unit_seed
from titanforge.models.registry import build_model
from memory_worker import BUDGET_MB  # noqa: E402 (tests/parallel is on sys.path: conftest.py)

pytestmark = pytest.mark.slow


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
def init_results(start_launch) -> list[dict]:
    return start_launch["init"]


def test_sharded_start_equals_single_process_start(init_results):
    combos = {(r["layout"], r["model"]) for r in init_results}
    assert {layout for layout, _ in combos} == {"fsdp", "tp", "pp_tp", "pp_fsdp", "pp_ddp", "ep", "ep_ddp"}
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
        # Only the rank's shards were ever allocated, and they are less than the whole model.
        assert r["allocated"] == r["local"] < r["whole"], (where, r)
        assert r["bad_grad_placements"] == ([] if r["layout"] == "pp_tp" else None), (where, r)
    pp_fsdp = [r for r in init_results if r["layout"] == "pp_fsdp"]
    # A stage sharded over dp=2: well under half the model per rank (the tied embedding's twin aside).
    assert all(r["local"] < 0.4 * r["whole"] for r in pp_fsdp if r["model"] == "llama"), pp_fsdp


def test_model_larger_than_the_budget_starts_and_trains_under_fsdp2(start_launch):
    four, one = start_launch["memory"]["four"], [start_launch["memory"]["one"]]
    assert four[0]["weights_mb"] > BUDGET_MB * 1.08
    for r in four:
        assert r["stage"] == "done", r
        assert r["peak_mb"] < BUDGET_MB, r
        # A quarter of the weights and of the gradients at least: the peak measures something.
        assert r["peak_mb"] > r["weights_mb"] / 2, r
        assert r["losses"][1] < r["losses"][0], r
    # The same model, budget and code in one process: it cannot even allocate its weights.
    assert one[0]["stage"] == "start" and "allocate" in one[0]["error"], one
