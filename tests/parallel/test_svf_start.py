"""SVF fine-tuning's sharded start (trainer/svf.py:SVFStart) under FSDP2 (dp=2), TP (tp=2) and DDP (dp=2)
against one process: one 2-rank launch of tests/parallel/svf_start_worker.py.

Checked per layout: the loss of one step's forward and every z gradient equal the single-process
SVF model's (Llama from init.from; Llama, Titans MAC, TTT-Linear and Jamba from the seed; float32:
loss to 1e-5 relative, z gradients to 1e-5 of the largest; measured
~1e-7, summation order); only z is trainable; the decomposition was split (each rank read only
its round-robin share of the whole base matrices, one at a time, never the others) and the SVD
cache beside init.from was written by the first layout and read by the second (which reads one
whole matrix only, to check the cache against the base); under FSDP2 a rank holds about half of
the SVF model's bytes. Peak memory during the start is not measured here (the model is tiny); the
bound follows from the code path: shards plus one matrix and its factors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_cases as cases  # noqa: E402

pytestmark = pytest.mark.slow

LOSS_RTOL, GRAD_TOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("svf_start")
    cases.torchrun(2, "svf_start_worker.py", str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], out


@pytest.mark.parametrize("layout", ["fsdp", "tp", "ddp"] + [f"{layout}_seed_{family}" for family in
                                                      ("llama", "titans", "ttt", "jamba") for layout in ("fsdp", "tp")])
def test_sharded_svf_start_matches_one_process(results, layout):
    for rank, res in enumerate(results[0]):
        r = res[layout]
        assert r["n_z"] == r["n_ref"] == len(r["names"]) > 0, (rank, r)
        assert abs(r["loss"] - r["ref_loss"]) <= LOSS_RTOL * abs(r["ref_loss"]), (rank, r)
        assert r["z_grad_err"] <= GRAD_TOL, (rank, r)
        assert r["trainable_not_z"] == [], (rank, r)
        if layout == "ddp":  # a replica per rank
            continue
        assert r["held_bytes"] < r["whole_bytes"], (rank, r)
        if layout.startswith("fsdp"):
            assert r["held_bytes"] < 0.6 * r["whole_bytes"], (rank, r)


def test_decomposition_is_split_and_cached_once(results):
    per_rank, out = results
    names = per_rank[0]["fsdp"]["names"]
    for rank, res in enumerate(per_rank):
        # Cache miss: this rank read exactly its share of whole matrices.
        assert res["fsdp"]["cache_hit"] is False and res["fsdp"]["matrices_read"] == names[rank::2], rank
        # Cache hit: one whole matrix, to check the cache reproduces the base.
        assert res["tp"]["cache_hit"] is True and res["tp"]["matrices_read"] == names[:1], rank
        # No init.from: nothing to cache beside; still split.
        seed = res["fsdp_seed_llama"]
        assert seed["cache_hit"] is False and seed["matrices_read"] == names[rank::2]
    caches = list((out / "base").glob("svd-*/index.json"))
    assert len(caches) == 1 and len(list(caches[0].parent.glob("*.safetensors"))) == len(names)
