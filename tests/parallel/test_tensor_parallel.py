"""Tensor + sequence parallelism against one process, with real 2-rank gloo processes.

One torchrun launch (tp_worker.py) runs every family's case in float64: the TP=2 loss equals the
single-process loss to 1e-10 (relative), every parameter's gradient to 1e-9 (max abs error over
max abs value), and 3 AdamW steps' losses to 1e-9; Titans and TTT hold half the memory heads per
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
         "ttt_linear", "ttt_mlp", "jamba"]
LOSS_TOL, GRAD_TOL = 1e-10, 1e-9


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(out), *CASES], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _case(results, name):
    for r, res in enumerate(results):
        assert "error" not in res[name], f"rank {r}:\n{res[name]['error']}"
    return results


@pytest.mark.parametrize("name", CASES)
def test_tp_matches_single_process(results, name):
    for res in (r[name] for r in _case(results, name)):
        assert res["plain_params"] == [], f"parameters left outside the tp mesh: {res['plain_params']}"
        assert abs(res["loss"] - res["ref_loss"]) <= LOSS_TOL * abs(res["ref_loss"])
        bad = {k: v for k, v in res["grad_rel"].items() if v == "missing" or v > GRAD_TOL}
        assert not bad, f"gradients differ from one process: {bad}"
        for lo, ref in zip(res["losses"], res["ref_losses"], strict=True):
            assert abs(lo - ref) <= GRAD_TOL * abs(ref), (res["losses"], res["ref_losses"])


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
