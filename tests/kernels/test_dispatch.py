"""The one dispatch rule (kernels/dispatch.py): CPU float -> C loop, anything else on CPU -> PyTorch,
forced Triton only where it can run; overrides from the config and the environment, with errors
that name the fix."""

import pytest
import torch

from titanforge.kernels import dispatch
from titanforge.kernels.norms import fused_cpu
from titanforge.models.config import ModelConfig

SRC = fused_cpu.SOURCE


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("TITANFORGE_KERNELS", raising=False)
    yield
    dispatch.set_overrides({})


def test_auto_rule_on_cpu():
    x = torch.randn(3, 4)
    assert dispatch.pick("rms_norm", "auto", x, native_source=SRC) == ("native" if fused_cpu.available() else "torch")
    assert dispatch.pick("rms_norm", "auto", x.half(), native_source=SRC) == "torch"
    assert dispatch.pick("linear_cross_entropy", "auto", x) == "torch"  # no C loop, not CUDA


def test_forced_triton_runs_in_the_interpreter_and_refuses_what_it_cannot(monkeypatch):
    x = torch.randn(3, 4)
    assert dispatch.pick("rms_norm", "triton", x) == "triton"  # TRITON_INTERPRET=1 in the tests
    with pytest.raises(ValueError, match="float64"):
        dispatch.pick("rms_norm", "triton", x.double())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        dispatch.pick("rms_norm", "triton", x)
    with pytest.raises(ValueError, match="has no C loop"):
        dispatch.pick("linear_cross_entropy", "native", x)
    with pytest.raises(ValueError, match="backend='gpu'"):
        dispatch.pick("rms_norm", "gpu", x)


def test_overrides_config_over_environment_explicit_over_both(monkeypatch):
    x = torch.randn(3, 4)
    monkeypatch.setenv("TITANFORGE_KERNELS", "*=torch, selective_scan=triton")
    assert dispatch.pick("rms_norm", "auto", x, native_source=SRC) == "torch"
    assert dispatch.pick("selective_scan", "auto", x) == "triton"
    dispatch.set_overrides({"rms_norm": "triton"})
    assert dispatch.pick("rms_norm", "auto", x, native_source=SRC) == "triton"
    assert dispatch.pick("rms_norm", "torch", x, native_source=SRC) == "torch"
    monkeypatch.setenv("TITANFORGE_KERNELS", "rms_norm:torch")
    with pytest.raises(ValueError, match="is not op=backend"):
        dispatch.overrides()


def test_config_names_are_checked_before_anything_runs():
    errs = ModelConfig(kernels={"rms_norm": "cuda", "scan": "torch"}).validate()
    assert any("backend 'cuda'" in e for e in errs)
    assert not ModelConfig(kernels={"*": "torch", "moe_permute": "triton"}).validate()
    with pytest.raises(ValueError, match="unknown kernel op 'scan'"):
        dispatch.set_overrides({"scan": "torch"})


def test_kernels_compile_without_graph_breaks():
    """The Triton paths are torch.library ops with fake kernels and autograd: a fullgraph compile
    traces through them (aot_eager: the same graph capture as inductor, without code generation)."""
    from titanforge.kernels.loss import linear_cross_entropy
    from titanforge.kernels.mamba import chunk_selective_scan
    from titanforge.kernels.norms import rms_norm

    def f(x, w, u, delta, A, B, C, W, t):
        y = rms_norm(x, w, 1e-5, x, backend="triton")
        s, _ = chunk_selective_scan(u, delta, A, B, C, backend="triton")
        return y.sum() + s.sum() + linear_cross_entropy(y, W, t, backend="triton")

    args = [torch.randn(6, 4, requires_grad=True), torch.randn(4, requires_grad=True),
            torch.randn(1, 6, 3, requires_grad=True), torch.rand(1, 6, 3), -torch.rand(3, 2), torch.randn(1, 6, 2),
            torch.randn(1, 6, 2), torch.randn(9, 4, requires_grad=True), torch.randint(0, 9, (6,))]
    leaves = [a for a in args if a.requires_grad]
    want = torch.autograd.grad(f(*args), leaves)
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(*args), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
