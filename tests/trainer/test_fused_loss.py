"""train.fused_cross_entropy: the LM head's loss from kernels/loss (no [tokens, vocab] logits) gives
the trainer's loss and gradients; the layouts it cannot serve and mistyped kernel overrides stop
the run at config time."""

import contextlib

import pytest
import torch

from titanforge.launch.config import ConfigError, load_config, validate
from titanforge.models.config import ModelConfig
from titanforge.models.registry import build_model
from titanforge.trainer.step import lm_loss


@pytest.mark.parametrize("tie,autocast", [(True, False), (False, False), (True, True)])
def test_fused_head_loss_equals_logits_loss(tie, autocast):
    model = build_model(ModelConfig(family="llama", vocab_size=71, d_model=24, n_layers=1, n_heads=2,
                                    ffn_hidden=32, tie_embeddings=tie))
    tokens = torch.randint(0, 71, (2, 11))
    out = []
    for fused in (False, True):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        loss, total = lm_loss(model, model, tokens, ctx, fused)
        out.append((loss.detach(), torch.autograd.grad(total, list(model.parameters()))))
    assert model.loss_targets is None  # cleared after the forward
    # bf16 autocast: both heads run their matmuls in bf16, rounding differently in places.
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1][0], out[0][0], **tol)
    for a, b in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("overrides,pattern", [
    (["train.fused_cross_entropy=true", "parallel.tp=2"], r"train\.fused_cross_entropy=true runs the plain layout"),
    (["model.kernels.rms_norm=cuda"], r"model\.kernels\.rms_norm: backend 'cuda'"),
])
def test_bad_kernel_settings_fail_at_config_time(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(load_config(None, ["data.path=d", *overrides]), world_size=2)
