"""Tensor + sequence parallelism, alone and under FSDP2, against one process, with real gloo processes.

Two torchrun launches (tp_worker.py) run every family's case in float64: TP=2 on 2 ranks, and
dp=2 x tp=2 on 4 ranks through the trainer's `parallelize` (TP+SP inside, FSDP2 over dp, each dp
rank taking half the global batch). In both the loss equals the single-process loss to 1e-10
(relative), every parameter's gradient to 1e-9 (max abs error over max abs value), and 5 AdamW
steps' losses to 1e-9. float64 leaves only summation-order differences (~1e-15); the margin
covers their growth through AdamW's normalisation. Titans and TTT hold half the memory heads per
rank. `check_tp` is tested in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from titanforge.models.config import ModelConfig
from titanforge.parallel.tensor_parallel import check_tp

WORKER = Path(__file__).with_name("tp_worker.py")
ROOT = Path(__file__).resolve().parents[2]
CASES = ["llama", "llama_untied_nosp", "titans_mac", "titans_mag", "titans_mal", "titans_lmm",
         "ttt_linear", "ttt_mlp", "jamba", "svf_llama", "svf_titans_mac", "svf_ttt_linear", "svf_jamba"]
LOSS_TOL, GRAD_TOL = 1e-10, 1e-9


def _launch(tmp_path_factory, nproc: int) -> list[dict]:
    out = tmp_path_factory.mktemp(f"tp{nproc}")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), str(WORKER), str(out), *CASES], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """tp=2 on 2 ranks."""
    return _launch(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def results_2d(tmp_path_factory):
    """dp=2 (FSDP2) x tp=2 on 4 ranks."""
    return _launch(tmp_path_factory, 4)


def _case(results, name):
    for r, res in enumerate(results):
        assert "error" not in res[name], f"rank {r}:\n{res[name]['error']}"
    return results


def _check_matches(results, name):
    for res in (r[name] for r in _case(results, name)):
        assert res["plain_params"] == [], f"parameters left outside the mesh: {res['plain_params']}"
        assert abs(res["loss"] - res["ref_loss"]) <= LOSS_TOL * abs(res["ref_loss"])
        bad = {k: v for k, v in res["grad_rel"].items() if v in ("missing", "trained") or v > GRAD_TOL}
        assert not bad, f"gradients differ from one process: {bad}"
        assert len(res["losses"]) == 5
        for lo, ref in zip(res["losses"], res["ref_losses"], strict=True):
            assert abs(lo - ref) <= GRAD_TOL * abs(ref), (res["losses"], res["ref_losses"])


@pytest.mark.parametrize("name", CASES)
def test_tp_matches_single_process(results, name):
    _check_matches(results, name)


@pytest.mark.parametrize("name", CASES)
def test_dp_x_tp_matches_single_process(results_2d, name):
    """Includes Mamba's in_proj (_StridedShard over tp), which FSDP must shard on another dim."""
    _check_matches(results_2d, name)


@pytest.mark.parametrize("name", [c for c in CASES if c.startswith(("titans", "ttt"))])
def test_memory_heads_are_sharded(results, name):
    for res in (r[name] for r in _case(results, name)):
        assert res["heads"], "no memory tensors found"
        assert set(res["heads"].values()) == {res["n_heads"] // 2}, res["heads"]


def test_vocab_parallel_cross_entropy(results):
    for res in (r["vocab_ce"] for r in _case(results, "vocab_ce")):
        assert abs(res["loss"] - res["ref_loss"]) <= 1e-12
        assert res["grad_rel"]["logits"] <= 1e-12


def test_check_tp_rejects_impossible_layouts():
    cfg = ModelConfig(family="llama", vocab_size=100, d_model=48, n_heads=6, n_kv_heads=3, ffn_hidden=96)
    assert check_tp(cfg, 1) == [] and check_tp(cfg, 3) != []
    errs = check_tp(cfg, 2)
    assert len(errs) == 1 and "model.n_kv_heads=3" in errs[0] and "tp in [1, 3]" in errs[0]
    errs = check_tp(cfg, 4)
    assert {e.split("=")[0] for e in errs} == {"model.n_heads", "model.n_kv_heads"}
    jamba = ModelConfig(family="jamba", vocab_size=64, d_model=30, n_heads=2)
    jamba.jamba.expand = 1
    jamba.jamba.layer_pattern = "MD SD"
    errs = check_tp(jamba, 4)
    assert any("Mamba-2" in e for e in errs) and any("d_inner" in e for e in errs)
    assert check_tp(cfg, 0) == ["parallel.tp=0 must be >= 1"]


@pytest.mark.parametrize("which", ["results", "results_2d"])
def test_checkpoint_round_trip_with_strided_mamba_shards(request, which):
    """The trainer's Checkpointer saves Jamba under tp=2 and dp=2 x tp=2 (Mamba's in_proj is a
    _StridedShard, which DCP cannot write as is) and loads it exactly into a plain full model and
    into a fresh model of the same layout: weights and AdamW moments bit-identical."""
    results = request.getfixturevalue(which)
    for res in (r["checkpoint"] for r in _case(results, "checkpoint")):
        for kind in ("plain", "same_layout"):
            assert res[kind]["missing"] == []
            assert res[kind]["weights"] == 0.0 and res[kind]["exp_avg"] == 0.0, res
