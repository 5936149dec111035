"""Long-context evaluation (trainer/evaluate.py, `titanforge eval`), the task mixture in training,
and the Llama sliding window it uses as the window-only baseline.

- The sliding-window mask against a float64 loop of the attention equations, and a window-only
  model's logits blind to tokens beyond n_layers * (window - 1).
- `titanforge eval` on a saved checkpoint of every family in one launch on 1 process and one on
  2 processes: the same per-cell numbers (correct counts exactly, answer log-probs to 1e-9).
- A short `titanforge train` with the task mixture and `eval.every`: the table printed, metrics
  in metrics.jsonl and W&B, the heat map on disk; answer-only loss equals the masked mean.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from testutil.launch_util import ROOT, env, metrics
from testutil.wandb_reader import history
from titanforge.launch.cli import main as titanforge
from titanforge.launch.config import ConfigError, load_config, to_yaml
from titanforge.models.common.layers import attention
from titanforge.models.llama.model import sliding_window_mask
from titanforge.models.registry import build_model
from titanforge.trainer.step import lm_loss

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=160"]
# One preset per family (llama as the window-only baseline).
FAMILIES = {"llama-tiny": ["model.n_kv_heads=1", "model.attention_window=24"], "titans-mac-tiny": [],
            "ttt-linear-tiny": [], "jamba-tiny": []}


def test_sliding_window_attention_matches_a_float64_loop():
    torch.manual_seed(1)
    B, T, H, G, D, W = 2, 37, 4, 2, 5, 7
    q, k, v = (torch.randn(B, T, n, D, dtype=torch.float64, requires_grad=True) for n in (H, G, G))
    out = attention(q, k, v, attn_mask=sliding_window_mask(T, W, "cpu"))
    ref = torch.zeros_like(out)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for i in range(T):
                js = list(range(max(0, i - W + 1), i + 1))
                s = torch.stack([q[b, i, h] @ k[b, j, g] for j in js]) / D ** 0.5
                ref[b, i, h] = (torch.softmax(s, 0)[:, None] * v[b, js, g]).sum(0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(out)
    gq = torch.autograd.grad((out * w).sum(), (q, k, v))
    gr = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(gq, gr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert sliding_window_mask(T, 0, "cpu") is None and sliding_window_mask(T, T, "cpu") is None


def test_window_only_llama_cannot_see_past_its_reach():
    job = load_config(ROOT / "configs" / "llama-tiny.yaml", ["data.path=x", *SMALL, "model.n_kv_heads=1",
                                                            "model.attention_window=6", "model.vocab_size=101"])
    torch.manual_seed(0)
    model = build_model(job.model, device="cpu")
    model.init_weights()
    model.double()
    x = torch.randint(0, 101, (1, 40))
    y = x.clone()
    y[0, :5] = (y[0, :5] + 1) % 101  # tokens 0..4 change
    a, b = model(x), model(y)
    # Two layers of window 6 reach 2 * 5 = 10 tokens back: position 15 onward cannot see tokens < 5.
    torch.testing.assert_close(a[0, 15:], b[0, 15:], rtol=0, atol=0)
    assert (a[0, 5:15] - b[0, 5:15]).abs().max() > 1e-6
    job.model.attention_window = 0
    full = build_model(job.model, device="cpu").double()
    full.load_state_dict(model.state_dict())
    assert (full(x)[0, 30:] - full(y)[0, 30:]).abs().max() > 1e-6


def test_answer_only_loss_is_the_masked_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 11)
    tokens = torch.randint(0, 11, (2, 10))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 3:5], mask[1, 8] = True, True
    loss, _ = lm_loss(lambda inp: logits, torch.nn.Module(), tokens, torch.autocast("cpu", enabled=False), loss_mask=mask)
    expect = F.cross_entropy(logits[mask], tokens[:, 1:][mask])
    torch.testing.assert_close(loss, expect)
    full, _ = lm_loss(lambda inp: logits, torch.nn.Module(), tokens, torch.autocast("cpu", enabled=False))
    assert not torch.allclose(full, expect)


def test_bad_task_and_eval_config_fail_before_anything_starts():
    with pytest.raises(ConfigError, match="key=integer"):
        load_config(None, ["data.path=x", "eval.suites=[mqar:pairs]", "eval.every=1"])
    with pytest.raises(ConfigError, match="quote specs that hold commas"):
        load_config(None, ["data.path=x", "data.tasks.names=[mqar:pairs=4,values=8]"])
    assert load_config(None, ["data.path=x", "data.tasks.names=['mqar:pairs=4,values=8']"]).data.tasks.names == [
        "mqar:pairs=4,values=8"]
    with pytest.raises(ConfigError, match="exceed model.max_seq_len"):
        load_config(None, ["data.path=x", "eval.lengths=[4096]", "model.max_seq_len=256"])
    with pytest.raises(ConfigError, match="one weight per task"):
        load_config(None, ["data.path=x", "data.tasks.names=[passkey]", "data.tasks.weights=[1,2]"])
    with pytest.raises(ConfigError, match="applies to family llama only"):
        load_config(None, ["data.path=x", "model.family=ttt", "model.attention_window=8"])
    with pytest.raises(ConfigError, match="not with parallel.pp"):
        load_config(None, ["data.path=x", "data.tasks.names=[passkey]", "parallel.pp=2"])
    assert titanforge(["eval", "/nonexistent", "--suite", "passkey"]) == 2
    assert titanforge(["eval", "/nonexistent", "--suite", "nope:x"]) == 2


def _save_checkpoints(root: Path, data: Path) -> list[Path]:
    """A step_1 checkpoint of each family, its initial weights, saved as training saves them."""
    from titanforge.trainer.checkpoint import Checkpointer
    from titanforge.trainer.config import CheckpointConfig
    from titanforge.trainer.dist import DistInfo
    from titanforge.trainer.optim import build_optimizer
    from titanforge.trainer.step import build_plain_model

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    out = []
    for preset, extra in FAMILIES.items():
        job = load_config(ROOT / "configs" / f"{preset}.yaml", [f"data.path={data}", *SMALL, *extra])
        model = build_plain_model(job, info.device)
        ck = Checkpointer(root / preset, CheckpointConfig(), info)
        ck.save(1, model, build_optimizer(model, job.optim), {}, {}, to_yaml(job))
        ck.close()
        out.append(root / preset / "step_00000001")
    return out


@pytest.mark.slow
def test_eval_every_family_same_numbers_on_1_and_2_processes(shakespeare64, tmp_path):
    ckpts = _save_checkpoints(tmp_path / "ck", shakespeare64)
    args = ["--suite", "passkey:digits=2", "--suite", "mqar:pairs=4", "--suite", "babilong", "--lengths", "64",
            "100", "--depths", "3", "--samples", "2", "--batch-size", "2"]
    assert titanforge(["eval", *map(str, ckpts), *args, "--out", str(tmp_path / "one.json")]) == 0
    proc = subprocess.run([sys.executable, "-P", "-m", "titanforge.launch.cli", "eval", *map(str, ckpts), *args,
                           "--out", str(tmp_path / "two.json"), "--nproc", "2"], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert set(one) == set(two) == {str(c) for c in ckpts}
    for ckpt, suites in one.items():
        assert set(suites) == {"passkey:digits=2", "mqar:pairs=4", "babilong"}
        for name, r in suites.items():
            o = two[ckpt][name]
            assert r["correct"] == o["correct"] and r["total"] == o["total"], (ckpt, name)
            assert abs(r["logprob"] - o["logprob"]) <= 1e-9 and r["logprob"] < 0, (ckpt, name)
            # Every cell has its answers: 2 samples x (1 answer, or 4 MQAR queries binned by depth).
            per_len = 2 * 3 * (4 if name.startswith("mqar") else 1)
            assert [sum(row) for row in r["total"]] == [per_len, per_len]
        assert (Path(ckpt) / "eval_babilong.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Different families give different answer log-probs (each checkpoint's weights were loaded).
    assert len({round(s["babilong"]["logprob"], 6) for s in one.values()}) == len(ckpts)


@pytest.mark.slow
def test_training_on_the_mixture_runs_the_suites(shakespeare64, tmp_path):
    out = tmp_path / "run"
    rc = titanforge(["train", str(ROOT / "configs" / "llama-tiny.yaml"), f"data.path={shakespeare64}",
                     f"output_dir={out}", *SMALL, "model.n_kv_heads=1", "model.attention_window=16",
                     "train.steps=4", "train.global_batch_size=4", "train.micro_batch_size=2", "train.val_every=0",
                     "checkpoint.every=4", "optim.warmup_steps=1", "wandb.mode=offline",
                     "data.tasks.names=[passkey:digits=2,mqar:pairs=4]", "data.tasks.fraction=0.5",
                     "eval.every=2", "eval.suites=[passkey:digits=2]", "eval.lengths=[64,128]", "eval.depths=2",
                     "eval.samples=2"])
    assert rc == 0
    rows = metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)
    ev = [r for r in rows if "eval/passkey:digits=2/accuracy" in r]
    assert [r["step"] for r in ev] == [2, 4]
    assert {"eval/passkey:digits=2/len_64", "eval/passkey:digits=2/len_128"} <= set(ev[0])
    for step in (2, 4):
        res = json.loads((out / "eval" / f"step_{step:08d}" / "eval_passkey_digits_2.json").read_text())
        assert res["total"] == [[2, 2], [2, 2]]
    run_file = next((out / "wandb").glob("*/run-*.wandb"))
    logged = history(run_file)
    assert any("eval/passkey:digits=2/accuracy" in h for h in logged)
    assert any(h.get("eval/passkey:digits=2/heatmap/_type") == "html-file" for h in logged)
