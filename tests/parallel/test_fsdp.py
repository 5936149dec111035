"""FSDP2 data parallelism (parallel/fsdp.py) against one process, with real 2-rank gloo runs.

One torchrun launch (tests/parallel/fsdp_worker.py) runs every check for all four families; this
file prepares the single-process checkpoint it loads, launches it once per session and asserts
on the numbers it reports. A second launch (4 ranks) checks FSDP over the dp dim of a dp x tp mesh.

Tolerances (float32): one step's loss within 1e-6 relative and every gradient within 1e-5
relative (L2 over the tensor) of the single-process reference (only the summation order
differs); 5 AdamW steps' losses within 1e-4 relative; checkpoint values bit-identical. bf16
parameters (mixed precision) are held to 3e-2.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_cases as cases  # noqa: E402

pytestmark = pytest.mark.slow


def dcp_quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        # No process group in this process: DCP warns that it assumes a single process.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(*args, **kwargs)


def save_single_process_checkpoint(out: Path) -> None:
    """llama after 2 AdamW steps in this process: DCP checkpoint, full values and the next loss."""
    model = cases.build("llama", seed=7)
    opt = cases.optimizer(model)
    inputs, targets = cases.global_batch(seed=5)
    for _ in range(2):
        opt.zero_grad()
        cases.loss_fn(model, inputs, targets).backward()
        opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp_quiet(dcp.save, {"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(out / "single_ckpt"))
    torch.save({"model": model_sd, "optimizer": optim_sd}, out / "single_full.pt")
    inputs, targets = cases.global_batch()
    opt.zero_grad()
    loss = cases.reference_step(model, inputs, targets, dp=2)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
    (out / "single_next.json").write_text(json.dumps({"next_loss": loss, "grad_norm": norm}))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fsdp")
    save_single_process_checkpoint(out)
    cases.torchrun(2, "fsdp_worker.py", str(out), *cases.FAMILIES, *cases.VARIANTS)
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("family", cases.FAMILIES + cases.VARIANTS)
def test_fsdp_step_matches_one_process(run, family):
    r = run[1][family]
    assert r["missing_grads"] == []
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-6 * abs(r["ref_loss"]), r
    assert r["grad_rel_err"] < 1e-5, f"{family}: worst gradient {r['worst_param']} rel err {r['grad_rel_err']:.2e}"


@pytest.mark.parametrize("family", cases.FAMILIES)
def test_fsdp_adamw_steps_match_one_process(run, family):
    r = run[1][family]
    losses, ref = torch.tensor(r["losses"]), torch.tensor(r["ref_losses"])
    assert len(losses) == len(ref) == cases.STEPS
    torch.testing.assert_close(losses, ref, rtol=1e-4, atol=0)
    # The optimizer really stepped: the loss on the repeated batch fell by far more than the tolerance.
    assert ref[-1] < ref[0] - 0.1


@pytest.mark.parametrize("family", cases.FAMILIES)
def test_fsdp_meta_init(run, family):
    """Meta build -> apply_fsdp -> to_empty -> init_weights on the shards gives a usable model."""
    r = run[1][family]["meta_init"]
    assert "error" not in r, r.get("error")
    assert r["bad_params"] == []
    assert abs(r["loss"] - math.log(cases.VOCAB)) < 0.1


@pytest.mark.parametrize("variant,tol", [("bf16", 3e-2), ("cpu_offload", 1e-5), ("no_reshard", 1e-5),
                                         ("accum", 1e-5), ("checkpointing", 1e-5)])
def test_fsdp_options(run, variant, tol):
    r = run[1][f"llama_{variant}"]
    assert r["missing_grads"] == []
    assert abs(r["loss"] - r["ref_loss"]) <= max(tol, 1e-6) * abs(r["ref_loss"]), r
    assert r["grad_rel_err"] < tol, f"{variant}: {r['worst_param']} rel err {r['grad_rel_err']:.2e}"
    if variant == "accum":
        # no_gradient_sync really skipped the first micro-batch's reduce-scatter.
        assert r["reduced_early"] is False


def test_dcp_single_process_checkpoint_loads_into_fsdp(run):
    out, result = run
    r = result["dcp"]
    assert r["load_keys_missing"] == [] and r["load_keys_extra"] == []
    assert r["n_keys"] > 20
    assert r["load_max_abs_diff"] == 0.0
    # Resuming at dp=2 gives the single process's next-step loss and gradient norm.
    expected = json.loads((out / "single_next.json").read_text())
    assert abs(r["next_loss"] - expected["next_loss"]) <= 1e-6 * expected["next_loss"]
    # parallel.fsdp.clip_grad_norm_: the global norm over shards, and clipping really scales.
    assert abs(r["grad_norm"] - expected["grad_norm"]) <= 1e-5 * expected["grad_norm"]
    assert abs(r["grad_norm_after_clip"] - expected["grad_norm"] / 2) <= 1e-5 * expected["grad_norm"]


def test_dcp_fsdp_checkpoint_loads_into_single_process(run):
    out, _ = run
    model = cases.build("llama", seed=123)
    opt = cases.optimizer(model)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp_quiet(dcp.load, state, checkpoint_id=str(out / "fsdp_ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    got = cases.flat_state(dict(zip(("model", "optimizer"), get_state_dict(model, opt))))
    want = cases.flat_state(torch.load(out / "fsdp_full.pt", weights_only=False))
    assert set(got) == set(want)
    # Adam state was really restored (not re-initialised): moments and step counts are non-zero.
    assert any("exp_avg_sq" in k and want[k].abs().sum() > 0 for k in want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_apply_fsdp_rejects_bad_input(run):
    no_layers, not_a_mesh, not_fsdp = run[1]["errors"]
    assert "no `layers` nn.ModuleDict" in no_layers
    assert "must be a DeviceMesh" in not_a_mesh
    assert "is not sharded with apply_fsdp" in not_fsdp


def test_fsdp_over_dp_of_2d_mesh(tmp_path):
    """4 ranks, mesh dp=2 x tp=2: TP on the feed-forward, FSDP over dp, against one process."""
    cases.torchrun(4, "fsdp_2d_worker.py", str(tmp_path))
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["dtensor_mesh_dims"] == ["dp", "tp"]
    assert r["missing_grads"] == []
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-6 * abs(r["ref_loss"]), r
    assert r["grad_rel_err"] < 1e-5, r
    assert r["mesh_error"].startswith("apply_fsdp: dp_mesh has 2 dimensions")
