"""Learning-rate schedules against hand-computed values, and weight-decay groups."""

import math

import pytest
import torch

from titanforge.models.common import RMSNorm
from titanforge.trainer.config import OptimConfig
from titanforge.trainer.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_warmup_is_linear_from_one_step():
    cfg = OptimConfig(warmup_steps=4)
    assert [lr_factor(s, 100, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_hand_values():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    # progress = (step - 10) / 90
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)


def test_wsd_hand_values():
    cfg = OptimConfig(warmup_steps=2, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    # 100 steps: stable until step 80, then linear to 0 at step 100.
    assert lr_factor(50, 100, cfg) == 1.0 and lr_factor(79, 100, cfg) == 1.0
    assert lr_factor(90, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.0)


def test_scheduler_drives_optimizer_lr():
    lin = torch.nn.Linear(3, 3)
    cfg = OptimConfig(lr=2.0, warmup_steps=2, schedule="constant")
    opt = build_optimizer(lin, cfg)
    sched = build_scheduler(opt, cfg, 10)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [1.0, 2.0, 2.0]


def test_decay_groups_split_matrices_from_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), RMSNorm(5), torch.nn.Embedding(7, 5))
    decay, no_decay = param_groups(model, 0.1)
    assert {p.shape for p in decay["params"]} == {torch.Size([5, 4]), torch.Size([7, 5])}
    assert {p.shape for p in no_decay["params"]} == {torch.Size([5])}
    assert len(no_decay["params"]) == 2 and no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
