"""Checkpoints: round trip, atomic commit, checksum verification, fallback, keep-last-N."""

import json
from pathlib import Path

import pytest
import torch

from titanforge.trainer.checkpoint import CheckpointError, Checkpointer, complete_checkpoints, verify
from titanforge.trainer.config import CheckpointConfig
from titanforge.trainer.dist import DistInfo

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    return model, opt


def _save(ck: Checkpointer, step: int, model, opt):
    ck.save(step, model, opt, {"data": {"pos": step}, "scheduler": {}, "rng": {}}, {"wandb_run_id": "abc"}, "x: 1\n")


def test_round_trip_restores_model_optimizer_and_rank_state(tmp_path):
    model, opt = _model_and_opt(0)
    ck = Checkpointer(tmp_path, CheckpointConfig(keep_last=3), INFO)
    _save(ck, 5, model, opt)
    other, other_opt = _model_and_opt(1)
    rank_state, meta = ck.load(ck.latest_valid(), other, other_opt)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) and torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
    assert rank_state["data"] == {"pos": 5} and meta["step"] == 5 and meta["wandb_run_id"] == "abc"
    assert (tmp_path / "step_00000005" / "config.yaml").read_text() == "x: 1\n"


def test_unfinished_save_is_never_taken(tmp_path):
    model, opt = _model_and_opt(0)
    ck = Checkpointer(tmp_path, CheckpointConfig(), INFO)
    _save(ck, 1, model, opt)
    # A crashed save leaves a .tmp folder (even a complete-looking one): it must be ignored.
    (tmp_path / "step_00000002.tmp").mkdir()
    (tmp_path / "step_00000002.tmp" / ".metadata").write_bytes(b"x")
    assert ck.latest_valid() == tmp_path / "step_00000001"


def test_corrupt_newest_falls_back_to_previous_and_keeps_the_file(tmp_path, capsys):
    model, opt = _model_and_opt(0)
    ck = Checkpointer(tmp_path, CheckpointConfig(keep_last=3), INFO)
    _save(ck, 1, model, opt)
    _save(ck, 2, model, opt)
    shard = next((tmp_path / "step_00000002").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is corrupted"):
        verify(tmp_path / "step_00000002")
    with pytest.warns(UserWarning, match="corrupted"):
        assert ck.latest_valid() == tmp_path / "step_00000001"
    assert "falling back to the previous checkpoint" in capsys.readouterr().out
    assert shard.exists()  # nothing already saved is deleted


def test_missing_file_is_reported(tmp_path):
    model, opt = _model_and_opt(0)
    ck = Checkpointer(tmp_path, CheckpointConfig(), INFO)
    _save(ck, 3, model, opt)
    (tmp_path / "step_00000003" / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt is missing"):
        verify(tmp_path / "step_00000003")


def test_keep_last_n(tmp_path):
    model, opt = _model_and_opt(0)
    ck = Checkpointer(tmp_path, CheckpointConfig(keep_last=2), INFO)
    for step in (1, 2, 3, 4):
        _save(ck, step, model, opt)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    sums = json.loads((tmp_path / "step_00000004" / "checksums.json").read_text())
    assert {".metadata", "meta.json", "config.yaml", "rank_00000.pt"} <= set(sums)


def test_resume_with_another_world_size_reshards_and_drops_rng(tmp_path, capsys):
    model, opt = _model_and_opt(0)
    ck = Checkpointer(tmp_path, CheckpointConfig(), INFO)
    ck.save(1, model, opt, {"data": {"pos": 7}, "scheduler": {}, "rng": {"torch": 1}}, {}, "")
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    other, other_opt = _model_and_opt(1)
    rank_state, meta = Checkpointer(tmp_path, CheckpointConfig(), two).load(tmp_path / "step_00000001", other, other_opt)
    assert rank_state["data"] == {"pos": 7} and "rng" not in rank_state and meta["world_size"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert "written by 1 ranks, this run has 2: resharding" in capsys.readouterr().out
