"""Pipeline parallelism against one process, with real gloo processes, plus in-process checks.

Three torchrun launches of pp_worker.py (float64, 4 layers, pp=2, 4 micro-batches of one sequence):
- 2 ranks: 1F1B for every family (Llama untied; Titans MAC/MAG/MAL/LMM, TTT linear/MLP and
  Jamba with MoE, all tied), interleaved 1F1B (2 stages per rank) for Llama and Jamba, GPipe for
  Llama;
- 4 ranks: pp=2 x dp=2 with FSDP2 (Llama, Jamba) and with DDP-style averaging (tied Llama),
  pp=2 x tp=2 (Llama, Jamba);
- 8 ranks: the 3-D mesh pp=2 x dp=2 (FSDP2) x tp=2 (Llama, Jamba).

Checked against the single-process model (same weights, same global batch as the same
micro-batches, aux losses included): the step's loss (relative 1e-10), every parameter's gradient
(max abs error / max abs value 1e-10; every parameter of the full model is held by some rank),
the clipped gradient norm and 5 AdamW steps' losses (relative 1e-9: AdamW divides by the root of
the second moment, which amplifies the last bits of small gradients), the validation forward, and
with dp=1 the MoE metrics rank 0 logs (1e-12); the weights after the steps, saved with DCP from
the stages (as the Checkpointer does) and loaded into a plain full model, equal the reference's
(1e-9; Jamba under TP included: its strided Mamba in_proj is stored re-sharded, as the
Checkpointer does). Float64 makes the only differences the order of
floating-point sums (observed: <= 2e-13).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titanforge.parallel.config import ParallelConfig
from titanforge.parallel.mesh import LayoutError
from titanforge.parallel.pipeline import (
    HeadOnlyEmbedding,
    build_stage_module,
    check_pipeline_microbatches,
    split_layers,
    stage_indices,
)

WORKER = Path(__file__).with_name("pp_worker.py")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
import pp_worker  # noqa: E402

LOSS_TOL, GRAD_TOL, STEP_TOL, METRIC_TOL = 1e-10, 1e-10, 1e-9, 1e-12


def _launch(tmp_path_factory, nproc: int) -> list[dict]:
    out = tmp_path_factory.mktemp(f"pp{nproc}")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), str(WORKER), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def results2(tmp_path_factory):
    return _launch(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def results4(tmp_path_factory):
    return _launch(tmp_path_factory, 4)


@pytest.fixture(scope="module")
def results8(tmp_path_factory):
    return _launch(tmp_path_factory, 8)


def _check(results: list[dict], name: str, dp: int) -> None:
    for r, res in enumerate(results):
        assert "error" not in res[name], f"rank {r}:\n{res[name]['error']}"
    covered = set()
    for r, res in enumerate(r[name] for r in results):
        assert res["dtypes"] == ["torch.float64"]
        assert abs(res["loss"] - res["ref_loss"]) <= LOSS_TOL * abs(res["ref_loss"]), (r, res["loss"], res["ref_loss"])
        bad = {k: v for k, v in res["grad_rel"].items() if v == "missing" or v > GRAD_TOL}
        assert not bad, f"rank {r}: gradients differ from one process: {bad}"
        covered |= set(res["grad_rel"])
        for lo, ref in zip(res["losses"], res["ref_losses"], strict=True):
            assert abs(lo - ref) <= STEP_TOL * abs(ref), (r, res["losses"], res["ref_losses"])
        for no, ref in zip(res["norms"], res["ref_norms"], strict=True):
            assert abs(no - ref) <= STEP_TOL * abs(ref), (r, res["norms"], res["ref_norms"])
        # Clipping ran (the norm exceeds the worker's max_norm), so its scaling was compared too.
        assert max(res["ref_norms"]) > pp_worker.CLIP
        if res["val_count"]:
            assert abs(res["val"] - res["ref_val"]) <= LOSS_TOL * res["ref_val"]
    assert covered == set(results[0][name]["all_params"]), "parameters held by no stage"
    for r, res in enumerate(r[name] for r in results):
        # Saved by DCP from the stages after the steps, loaded into a plain full model.
        assert set(res["ckpt_rel"]) == set(res["all_params"])
        bad = {k: v for k, v in res["ckpt_rel"].items() if v > STEP_TOL}
        assert not bad, f"rank {r}: checkpointed weights differ from one process's: {bad}"
    # The last stage's ranks (dp x tp of them) report validation losses; the others count nothing.
    assert sum(r[name]["val_count"] for r in results) == len(results) // 2
    m, ref = results[0][name]["metrics"], results[0][name]["ref_metrics"]
    assert set(m) == set(ref), "metrics of some stage did not reach rank 0"
    if dp == 1:
        # With dp > 1 each dp rank logs its own micro-batch's metrics, as the plain step does.
        assert all(abs(m[k] - ref[k]) <= METRIC_TOL * max(1.0, abs(ref[k])) for k in ref), (m, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(pp_worker.CASES_2))
def test_pp2_matches_single_process(results2, name):
    _check(results2, name, dp=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(pp_worker.CASES_4))
def test_pp2_with_dp_or_tp_matches_single_process(results4, name):
    _check(results4, name, dp=1 if "tp" in pp_worker.CASES_4[name][1] else 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(pp_worker.CASES_8))
def test_3d_pp_dp_tp_matches_single_process(results8, name):
    """The 3-D mesh pp=2 x dp=2 (FSDP2) x tp=2 on 8 ranks (about 45 s on 2 cores)."""
    _check(results8, name, dp=2)


@pytest.mark.slow
def test_jamba_aux_losses_and_metrics_reach_rank0(results2):
    res = results2[0]["jamba_1f1b"]
    # Two MoE layers (1 and 3), one per stage: rank 0 logs both.
    assert {k.split(".")[1] for k in res["metrics"]} == {"1", "3"}


def test_split_layers_balanced_and_contiguous():
    assert split_layers(4, 2) == [[0, 1], [2, 3]]
    assert split_layers(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_layers(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(LayoutError, match="cannot split 2 layers into 3 pipeline stages; use between 1 and 2"):
        split_layers(2, 3)
    assert stage_indices(1, 2, 2) == [1, 3]


@pytest.mark.parametrize("name", ["llama", "llama_tied", "titans_mac", "ttt_linear", "jamba"])
def test_stages_chain_to_the_full_model(name):
    """One process: the stage modules, run one after another, give the full model's logits, and
    their parameters are the full model's, under the same names."""
    torch.manual_seed(0)
    from titanforge.models.registry import build_model

    model = build_model(pp_worker.MODELS[name]()).double()
    tokens = torch.randint(0, 96, (2, 32))
    full_names = {n for n, _ in model.named_parameters()}
    for n_stages in (2, 4):
        h, names = tokens, set()
        for s in range(n_stages):
            stage = build_stage_module(model, s, n_stages)
            names |= {n for n, _ in stage.named_parameters()}
            assert (stage.tok_embeddings is not None) == (s == 0 or (s == n_stages - 1 and model.output is None))
            if s > 0 and stage.tok_embeddings is not None:
                assert isinstance(stage.tok_embeddings, HeadOnlyEmbedding)
            h = stage(h)
        assert names == full_names
        with torch.no_grad():
            assert torch.equal(h.detach(), model(tokens).detach())


@pytest.mark.parametrize("schedule,n,pattern", [
    ("1f1b", 1, r"1f1b needs at least pp=2 micro-batches per step, got 1"),
    ("interleaved_1f1b", 3, r"micro-batches per step \(3\) to be a multiple of pp=2"),
])
def test_microbatches_checked(schedule, n, pattern):
    cfg = ParallelConfig(pp=2, pp_schedule=schedule, pp_virtual_stages=2 if "inter" in schedule else 1)
    errs = check_pipeline_microbatches(cfg, n)
    assert errs and __import__("re").search(pattern, errs[0]), errs
    assert check_pipeline_microbatches(cfg, 4) == []
    assert check_pipeline_microbatches(ParallelConfig(pp=2, pp_schedule="gpipe"), 1) == []
