"""Every family trained a few steps with its kernels forced to the Triton path (run by the
interpreter on CPU) equals the same model on the PyTorch path: losses of each step and the final
weights. Forcing goes through the config override (model.kernels), as a user debugging would."""

import pytest
import torch

from titanforge.kernels import dispatch
from titanforge.models.common.moe import MoEConfig
from titanforge.models.config import ModelConfig
from titanforge.models.jamba.config import JambaConfig
from titanforge.models.registry import build_model
from titanforge.models.titans.config import TitansConfig
from titanforge.models.ttt.config import TTTConfig

V = 53
CONFIGS = {
    "llama": dict(family="llama", d_model=24, n_layers=2, n_heads=2, ffn_hidden=32, tie_embeddings=False),
    "titans": dict(family="titans", d_model=24, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=64,
                   titans=TitansConfig(segment_len=8, chunk_size=4, n_persistent=2)),
    "ttt": dict(family="ttt", d_model=24, n_layers=1, n_heads=2, ffn_hidden=32,
                ttt=TTTConfig(inner="linear", backbone="mamba", mini_batch_size=4)),
    "ttt_mlp": dict(family="ttt", d_model=24, n_layers=1, n_heads=2, ffn_hidden=32,
                    ttt=TTTConfig(inner="mlp", backbone="transformer", mini_batch_size=4)),
    "jamba": dict(family="jamba", d_model=16, n_layers=2, n_heads=2, ffn_hidden=32,
                  jamba=JambaConfig(layer_pattern="MD SE", d_state=4, mamba2_headdim=16,
                                    moe=MoEConfig(n_experts=3, top_k=2, load_balance_coef=1e-2))),
}


def train(cfg: ModelConfig, tokens: torch.Tensor, fused_ce: bool, steps: int = 2):
    torch.manual_seed(0)
    model = build_model(cfg)
    # SGD: Adam would turn float32 rounding in near-zero gradients into full-size steps.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        if fused_ce:
            model.loss_targets = tgt
            loss = model(inp)
            model.loss_targets = None
        else:
            loss = torch.nn.functional.cross_entropy(model(inp).flatten(0, 1), tgt.flatten())
        aux = sum(v for m in model.modules() for v in (getattr(m, "aux_losses", None) or {}).values())
        (loss + aux).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_family_trains_the_same_on_the_triton_path(family):
    tokens = torch.randint(0, V, (2, 13))
    fused = family == "llama"  # the fused linear + cross-entropy head on one family is enough
    cfg = lambda path: ModelConfig(vocab_size=V, kernels={"*": path}, **CONFIGS[family])  # noqa: E731
    dispatch.counts.clear()
    try:
        ref_losses, ref_params = train(cfg("torch"), tokens, fused)
        picked = dispatch.counts.copy()
        dispatch.counts.clear()
        losses, params = train(cfg("triton"), tokens, fused)
    finally:
        dispatch.set_overrides({})
    ops = {op for (op, path) in dispatch.counts if path == "triton"}
    assert "rms_norm" in ops and all(path == "torch" for (_, path) in picked)
    if family == "titans":
        assert "titans_memory" in ops
    if family.startswith("ttt"):
        assert ("ttt_mlp" if family == "ttt_mlp" else "ttt_linear") in ops
    if family == "jamba":
        assert {"selective_scan", "ssd", "causal_conv", "moe_permute"} <= ops
    if fused:
        assert "linear_cross_entropy" in ops
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for a, b in zip(params, ref_params):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
