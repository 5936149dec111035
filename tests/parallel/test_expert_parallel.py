"""Expert parallelism (parallel/expert_parallel.py) against one process, with real gloo runs.

Two torchrun launches of tests/parallel/ep_worker.py: 2 ranks (dp=2, ep=2: dp_rep=1) and 4 ranks
(dp=4, ep=2: dp_rep=2, so the experts' gradients are also averaged over dp_rep). Cases: the tiny
Jamba of fsdp_cases (one MoE layer), an all-MoE Jamba with renormalised top-k, and the latter with
capacity factor 1 (assignments dropped); DDP and FSDP2 each.

Tolerances. float64 runs: the loss within 1e-12 relative, every gradient within 1e-10 relative
(L2 over the tensor) of the single process, 5 AdamW steps' losses within 1e-10 relative: only the
summation order differs (the all-to-all permutes rows; the reductions add in another order), which
in float64 costs ~1e-16 per operation. float32 through `parallelize` (FSDP reducing in float32):
gradients within 1e-5, as the FSDP tests. Dropped-assignment counts, local shapes and checkpoint
values are exact.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

sys.path.insert(0, str(Path(__file__).parent))
import ep_worker  # noqa: E402
import fsdp_cases as cases  # noqa: E402

pytestmark = pytest.mark.slow

GRAD_TOL, LOSS_TOL, STEPS_TOL = 1e-10, 1e-12, 1e-10


@pytest.fixture(scope="module")
def run2(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ep2")
    cases.torchrun(2, "ep_worker.py", str(out))
    return out, json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def run4(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ep4")
    cases.torchrun(4, "ep_worker.py", str(out))
    return json.loads((out / "result.json").read_text())


def _result(run2, run4, world):
    return run2[1] if world == 2 else run4


def _check_step(r, tol=GRAD_TOL, loss_tol=LOSS_TOL):
    assert r["names_match"] and r["missing_grads"] == [], r
    assert abs(r["loss"] - r["ref_loss"]) <= loss_tol * abs(r["ref_loss"]), r
    assert r["grad_rel_err"] < tol, f"worst gradient {r['worst_param']} rel err {r['grad_rel_err']:.2e}"


STEP_CASES = [(2, name, b) for name in ep_worker.CASES for b in ("ddp", "fsdp")] + \
             [(4, name, b) for name in ("jamba", "moe-capacity") for b in ("ddp", "fsdp")]


@pytest.mark.parametrize("world,name,backend", STEP_CASES)
def test_ep_step_matches_one_process(run2, run4, world, name, backend):
    r = _result(run2, run4, world)[f"{name}/{backend}"]
    _check_step(r)
    # Each rank's dropped counts equal those of the same micro-batch in one process (capacity per rank).
    assert r["drops"] == r["ref_drops"]
    if name == "moe-capacity":
        assert sum(map(sum, r["drops"])) > 0, "the capacity case must really drop assignments"
    # The clipped norm counts every expert shard once, and clipping scales every gradient.
    assert abs(r["grad_norm"] - r["ref_grad_norm"]) <= 1e-12 * r["ref_grad_norm"]
    # (clipping divides by norm + 1e-6, as torch.nn.utils.clip_grad_norm_)
    assert abs(r["grad_norm_after_clip"] - r["grad_norm"] / 2) <= 1e-5 * r["grad_norm"]


@pytest.mark.parametrize("world,name,backend", [c for c in STEP_CASES if c[1] != "moe-capacity"])
def test_ep_adamw_steps_match_one_process(run2, run4, world, name, backend):
    r = _result(run2, run4, world)[f"{name}/{backend}"]
    losses, ref = torch.tensor(r["losses"], dtype=torch.float64), torch.tensor(r["ref_losses"], dtype=torch.float64)
    assert len(losses) == len(ref) == cases.STEPS
    torch.testing.assert_close(losses, ref, rtol=STEPS_TOL, atol=0)
    assert ref[-1] < ref[0] - 0.1


@pytest.mark.parametrize("world,backend", [(2, "ddp"), (2, "fsdp"), (4, "ddp"), (4, "fsdp")])
def test_each_rank_holds_its_share_of_the_experts(run2, run4, world, backend):
    result = _result(run2, run4, world)
    assert (result["ep"], result["dp_rep"]) == (2, world // 2)
    layout = result[f"moe/{backend}" if world == 2 else f"jamba/{backend}"]["layout"]
    assert len(layout) == (6 if world == 2 else 3)  # w1, w3, w2 of each MoE layer
    for p in layout:
        assert p["global"][0] == 4
        # DDP: E/ep experts per rank; FSDP2 additionally shards the ep shard over dp_rep.
        per_rank = 4 // 2 // (result["dp_rep"] if backend == "fsdp" else 1)
        assert p["local"][0] == per_rank and p["local"][1:] == p["global"][1:], p
        assert p["mesh_dims"] == (["ep"] if backend == "ddp" else ["dp_rep", "ep"]), p


@pytest.mark.parametrize("key", ["jamba/ddp_checkpointing", "jamba/fsdp_checkpointing"])
def test_ep_with_activation_checkpointing(run2, key):
    """Recomputation in backward repeats the all-to-alls on every rank in the same order."""
    _check_step(run2[1][key])


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_parallelize_applies_ep_float32(run2, backend):
    _check_step(run2[1][f"parallelize/{backend}"], tol=1e-5, loss_tol=1e-6)


def test_ep_checkpoint_loads_into_one_process(run2):
    """DCP checkpoint saved at ep=2 (DDP, after 5 AdamW steps) -> one process: identical values."""
    out, _ = run2
    model = ep_worker.build("jamba", seed=123)
    opt = cases.optimizer(model)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optimizer": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(out / "ep_ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    got = cases.flat_state(dict(zip(("model", "optimizer"), get_state_dict(model, opt))))
    want = cases.flat_state(torch.load(out / "ep_full.pt", weights_only=False))
    assert set(got) == set(want)
    experts = [k for k in want if k.startswith("model.") and ".experts.w" in k]
    assert len(experts) == 3 and all(want[k].shape[0] == 4 for k in experts)
    assert any("experts.w1.exp_avg_sq" in k and want[k].abs().sum() > 0 for k in want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # The loaded single-process model is the trained one: not the seed-123 init.
    assert not torch.equal(got["model.layers.1.feed_forward.experts.w1"],
                           ep_worker.build("jamba", seed=123).layers["1"].feed_forward.experts.w1.detach())


def test_apply_expert_parallel_rejects_bad_input(run2):
    no_moe, not_a_mesh, twice = run2[1]["errors"]
    assert "Llama has no mixture-of-experts layers" in no_moe and "parallel.ep=1" in no_moe
    assert "ep_mesh must be a 1-D DeviceMesh" in not_a_mesh
    assert "already expert parallel" in twice


def test_ep_experts_with_empty_segments(run2, run4):
    """Counts that send no rows to one rank's experts: outputs, input and expert gradients still
    equal `expert_forward` on the full weights (expert gradients: the ep mean), float64."""
    for r in (run2[1]["zero_rows"], run4["zero_rows"]):
        assert r["max_rel_err"] < GRAD_TOL, r
        assert r["idle_grad_is_zero"]
