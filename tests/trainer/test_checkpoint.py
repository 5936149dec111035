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


def _flip(ckpt: Path) -> None:
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_keep_last_counts_only_checkpoints_that_verify(tmp_path):
    model, opt = _model_and_opt(0)
    ck = Checkpointer(tmp_path, CheckpointConfig(keep_last=2), INFO)
    _save(ck, 1, model, opt)
    _save(ck, 2, model, opt)
    _flip(tmp_path / "step_00000002")
    ck = Checkpointer(tmp_path, CheckpointConfig(keep_last=2), INFO)  # a new run: nothing known valid yet
    _save(ck, 3, model, opt)
    # Two good ones survive (3 and 1); the corrupt 2 is not counted and is left for inspection.
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000001", "step_00000002", "step_00000003"]
    _save(ck, 4, model, opt)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_only_corrupt_checkpoints_refuse_a_fresh_start_unless_allowed(tmp_path, capsys):
    model, opt = _model_and_opt(0)
    ck = Checkpointer(tmp_path, CheckpointConfig(), INFO)
    _save(ck, 1, model, opt)
    _flip(tmp_path / "step_00000001")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"none of the 1 checkpoints .* "
                                                                        r"checkpoint\.allow_fresh_start=true"):
        ck.latest_valid()
    assert "no older checkpoint" in capsys.readouterr().out
    with pytest.warns(UserWarning):
        assert ck.latest_valid(allow_fresh_start=True) is None
    assert "starting from step 0 as asked" in capsys.readouterr().out


def test_load_into_another_model_refuses_and_loads_nothing(tmp_path):
    model, opt = _model_and_opt(0)
    ck = Checkpointer(tmp_path, CheckpointConfig(), INFO)
    _save(ck, 1, model, opt)
    torch.manual_seed(3)
    other = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4))  # 3 -> 4 outputs
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(CheckpointError, match=r"does not fit this model \(shapes differ: 2\.bias saved \[3\] vs "
                                              r"model \[4\]; 2\.weight saved \[3, 7\] vs model \[4, 7\]"):
        ck.load(tmp_path / "step_00000001", other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    fewer = torch.nn.Sequential(torch.nn.Linear(5, 7))
    with pytest.raises(CheckpointError, match=r"not in the model: 2\.bias, 2\.weight"):
        ck.load(tmp_path / "step_00000001", fewer, torch.optim.AdamW(fewer.parameters()))


def test_resume_config_comparison_names_model_and_schedule_changes():
    from titanforge.trainer.checkpoint import compare_configs

    saved = "model:\n  n_layers: 4\n  d_model: 32\ntrain:\n  steps: 40\n  seed: 0\noptim:\n  lr: 0.001\n"
    new = "model:\n  n_layers: 3\n  d_model: 32\ntrain:\n  steps: 60\n  seed: 1\noptim:\n  lr: 0.001\n"
    model, schedule = compare_configs(saved, new)
    assert model == ["model.n_layers: 4 -> 3"] and schedule == ["train.steps: 40 -> 60"]


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, capsys):
    import subprocess
    import sys

    from titanforge.trainer.runlock import RunLock, RunLockError, check

    lock = RunLock(tmp_path)
    with pytest.raises(RunLockError, match=r"in use by another run \(pid \d+ on .*checkpoint\.break_lock=true"):
        RunLock(tmp_path)
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    # A holder that died without releasing (SIGKILL): its pid no longer runs.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = RunLock(tmp_path)
    text = (tmp_path / "run.lock").read_text().replace(f'"pid": {__import__("os").getpid()}',
                                                       f'"pid": {int(dead.stdout)}')
    (tmp_path / "run.lock").write_text(text)
    check(tmp_path)  # stale: no error
    again = RunLock(tmp_path)
    assert "its process is gone" in capsys.readouterr().out
    again.release()
    lock.release()
