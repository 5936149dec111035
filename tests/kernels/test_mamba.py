"""Chunked Mamba-1 scan and Mamba-2 SSD against the sequential references in float64:
outputs, the final state and the gradients of every input (incl. the initial state), on odd
lengths; and two pieces with the state carried equal one pass."""

import pytest
import torch

from testutil.kernel_util import on_threads, poisoned_empty, rel_rms
import titanforge.kernels.mamba.chunk as chunk
import titanforge.kernels.mamba.fused_cpu as fused_cpu
import titanforge.kernels.native as native
from titanforge.kernels.mamba import chunk_selective_scan, chunk_ssd, naive_selective_scan, naive_ssd


@pytest.fixture(autouse=True)
def _poison_empty():
    with poisoned_empty():
        yield


def mamba1_inputs(Bsz, T, D, N, dtype=torch.float64):
    g = torch.Generator().manual_seed(T * 7 + D)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(Bsz, T, D),
        # softplus output range: small and large steps, so some decays are ~0 and some ~1.
        delta=torch.nn.functional.softplus(r(Bsz, T, D) * 2 - 1),
        A=-torch.exp(r(D, N) * 0.5),
        B=r(Bsz, T, N),
        C=r(Bsz, T, N),
        D=r(D),
        initial_state=r(Bsz, D, N),
    )


def with_gate(inputs):
    """The inputs plus a gate z [B, T, D] (out = (y + D u) * silu(z))."""
    g = torch.Generator().manual_seed(99)
    return {**inputs, "z": torch.randn(inputs["u"].shape, generator=g, dtype=inputs["u"].dtype) * 2}


def run_with_grads(fn, inputs, seed=1):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, h = fn(**leaves, output_final_state=True)
    g = torch.Generator().manual_seed(seed)
    # Random cotangents on both outputs, so the final-state path is checked too.
    # Drawn in float64 whatever the outputs' dtype, so float32 runs see the same cotangents.
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)).sum() \
        + (h * torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)).sum()
    loss.backward()
    return y.detach(), h.detach(), {k: v.grad for k, v in leaves.items()}


# chunk 0 is the sequential scan: the fused C loop ("native") or PyTorch ops in time blocks.
@pytest.mark.parametrize("T,chunk,backend", [(63, 16, "torch"), (100, 64, "torch"), (5, 8, "torch"),
                                             (37, 1, "torch"), (63, 0, "torch"), (100, 0, "torch"),
                                             (63, 0, "native"), (100, 0, "native")])
def test_selective_scan_matches_naive(T, chunk, backend):
    inputs = with_gate(mamba1_inputs(2, T, 24, 5))
    y_ref, h_ref, g_ref = run_with_grads(naive_selective_scan, inputs)
    y, h, g = run_with_grads(lambda **kw: chunk_selective_scan(**kw, chunk_size=chunk, backend=backend), inputs)
    assert rel_rms(y, y_ref) < 1e-12
    assert rel_rms(h, h_ref) < 1e-12
    for k in g_ref:
        assert rel_rms(g[k], g_ref[k]) < 1e-10, k


# The sequential default runs time in cache-sized blocks (~2^18 state elements, so one block at
# these sizes); forcing short blocks checks the carries across block boundaries both ways,
# including blocks that do not divide T and one-step blocks.
@pytest.mark.parametrize("T,block", [(63, 16), (100, 7), (37, 1), (64, 32), (5, 4)])
@pytest.mark.parametrize("with_h0", [True, False])
def test_sequential_scan_blocks_match_naive(T, block, with_h0, monkeypatch):
    monkeypatch.setattr(chunk, "_block_len", lambda T, plane: block)
    inputs = mamba1_inputs(2, T, 24, 5)
    if not with_h0:
        inputs.pop("initial_state")
    y_ref, h_ref, g_ref = run_with_grads(naive_selective_scan, inputs)
    y, h, g = run_with_grads(lambda **kw: chunk_selective_scan(**kw, chunk_size=0, backend="torch"), inputs)
    assert rel_rms(y, y_ref) < 1e-12
    assert rel_rms(h, h_ref) < 1e-12
    for k in g_ref:
        assert rel_rms(g[k], g_ref[k]) < 1e-10, k


def test_selective_scan_without_initial_state_and_float32():
    inputs = mamba1_inputs(1, 63, 16, 4)
    inputs.pop("initial_state")
    y_ref, _ = naive_selective_scan(**inputs)
    y, h = chunk_selective_scan(**{k: v.float() for k, v in inputs.items()}, chunk_size=16)
    assert h is None
    assert rel_rms(y.double(), y_ref) < 1e-5


@pytest.mark.parametrize("chunk_size", [16, 0])
def test_selective_scan_split_equals_one_pass(chunk_size):
    inputs = mamba1_inputs(2, 100, 12, 4)
    y_full, h_full = chunk_selective_scan(**inputs, output_final_state=True, chunk_size=chunk_size)
    first = {k: (v[:, :41] if v.dim() == 3 and k not in ("A", "initial_state") else v) for k, v in inputs.items()}
    second = {k: (v[:, 41:] if v.dim() == 3 and k not in ("A", "initial_state") else v) for k, v in inputs.items()}
    y1, h1 = chunk_selective_scan(**first, output_final_state=True, chunk_size=chunk_size)
    second["initial_state"] = h1
    y2, h2 = chunk_selective_scan(**second, output_final_state=True, chunk_size=chunk_size)
    assert rel_rms(torch.cat([y1, y2], 1), y_full) < 1e-12
    assert rel_rms(h2, h_full) < 1e-12


def test_selective_scan_bad_shapes():
    inputs = mamba1_inputs(1, 10, 8, 4)
    inputs["B"] = inputs["B"][:, :, :3]
    with pytest.raises(ValueError, match="B has shape"):
        chunk_selective_scan(**inputs)
    inputs = mamba1_inputs(1, 10, 8, 4)
    with pytest.raises(ValueError, match="chunk_size=-1"):
        chunk_selective_scan(**inputs, chunk_size=-1)


def ssd_inputs(Bsz, T, H, P, G, N, dtype=torch.float64):
    g = torch.Generator().manual_seed(T + H)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=r(Bsz, T, H, P), dt=torch.nn.functional.softplus(r(Bsz, T, H) - 1),
                A=-torch.exp(r(H) * 0.5), B=r(Bsz, T, G, N), C=r(Bsz, T, G, N), D=r(H),
                initial_state=r(Bsz, H, P, N))


@pytest.mark.parametrize("T,chunk,G", [(63, 16, 1), (100, 32, 3), (7, 64, 3)])
def test_ssd_matches_naive(T, chunk, G):
    inputs = ssd_inputs(2, T, 3 * 2 if G == 3 else 3, 5, G, 7)
    y_ref, h_ref, g_ref = run_with_grads(naive_ssd, inputs)
    y, h, g = run_with_grads(lambda **kw: chunk_ssd(**kw, chunk_size=chunk), inputs)
    assert rel_rms(y, y_ref) < 1e-12
    assert rel_rms(h, h_ref) < 1e-12
    for k in g_ref:
        assert rel_rms(g[k], g_ref[k]) < 1e-10, k


def test_ssd_split_equals_one_pass():
    inputs = ssd_inputs(1, 100, 4, 3, 2, 5)
    y_full, h_full = chunk_ssd(**inputs, output_final_state=True, chunk_size=16)
    cut = lambda sl: {k: (v[:, sl] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}  # noqa: E731
    y1, h1 = chunk_ssd(**cut(slice(0, 57)), output_final_state=True, chunk_size=16)
    second = cut(slice(57, None))
    second["initial_state"] = h1
    y2, h2 = chunk_ssd(**second, output_final_state=True, chunk_size=16)
    assert rel_rms(torch.cat([y1, y2], 1), y_full) < 1e-12
    assert rel_rms(h2, h_full) < 1e-12


def test_ssd_bad_groups():
    inputs = ssd_inputs(1, 10, 4, 3, 3, 5)
    with pytest.raises(ValueError, match="divisible"):
        chunk_ssd(**inputs)


def test_selective_scan_second_backward_fails_loudly():
    # The chunked path reuses its saved decays as scratch in backward; a retained graph must
    # refuse a second pass (saved-tensor version check) rather than return wrong gradients.
    inputs = {k: v.requires_grad_(True) for k, v in mamba1_inputs(1, 20, 8, 4).items()}
    y, _ = chunk_selective_scan(**inputs, chunk_size=8)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_sequential_scan_second_backward_is_exact(backend, monkeypatch):
    # Both sequential paths recompute their decays and write nothing they saved: a retained graph
    # backpropagated twice accumulates exactly twice the gradients.
    monkeypatch.setattr(chunk, "_block_len", lambda T, plane: 6)
    monkeypatch.setattr(fused_cpu, "CHECKPOINT_EVERY", 6)
    inputs = {k: v.requires_grad_(True) for k, v in mamba1_inputs(1, 20, 8, 4).items()}
    y, h = chunk_selective_scan(**inputs, output_final_state=True, backend=backend)
    loss = (y * y).sum() + h.sum()
    loss.backward(retain_graph=True)
    first = {k: v.grad.clone() for k, v in inputs.items()}
    loss.backward()
    for k, v in inputs.items():
        assert torch.equal(v.grad, 2 * first[k]), k


# The fused C scan (fused_cpu.py): a task is (batch row, tile of 64 channels) and backward
# recomputes K-step blocks from checkpoints, so widths that leave a partial tile (70, 130), one and
# several tiles, and checkpoint intervals that do not divide T (incl. K = 1 and K > T) are checked.
@pytest.mark.parametrize("Bsz,T,D,N,K", [(2, 63, 70, 5, 16), (3, 100, 130, 7, 7), (1, 37, 24, 16, 1),
                                         (2, 64, 64, 3, 64), (1, 5, 9, 2, 8)])
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("gate", ["z", "no_z", "no_D"])
def test_native_scan_matches_naive(Bsz, T, D, N, K, with_h0, gate, monkeypatch):
    monkeypatch.setattr(fused_cpu, "CHECKPOINT_EVERY", K)
    inputs = mamba1_inputs(Bsz, T, D, N)
    if not with_h0:
        inputs.pop("initial_state")
    # The D skip and the SiLU gate are applied inside the C loop; each is optional.
    if gate == "z":
        inputs = with_gate(inputs)
    elif gate == "no_D":
        inputs.pop("D")
    y_ref, h_ref, g_ref = run_with_grads(naive_selective_scan, inputs)
    y, h, g = run_with_grads(lambda **kw: chunk_selective_scan(**kw, backend="native"), inputs)
    assert rel_rms(y, y_ref) < 1e-12
    assert rel_rms(h, h_ref) < 1e-12
    for k in g_ref:
        assert rel_rms(g[k], g_ref[k]) < 1e-10, k


def test_native_scan_float32_against_float64_reference():
    # float32 uses a polynomial exp2 (relative error < 1e-7); the float64 path uses libm's.
    inputs = with_gate(mamba1_inputs(2, 100, 70, 16))
    y_ref, h_ref, g_ref = run_with_grads(naive_selective_scan, inputs)
    def fp32(output_final_state, **kw):
        return chunk_selective_scan(**{k: v.float() for k, v in kw.items()},
                                    output_final_state=output_final_state, backend="native")

    y, h, g = run_with_grads(fp32, inputs)
    assert y.dtype == torch.float32
    assert rel_rms(y.double(), y_ref) < 1e-5
    assert rel_rms(h.double(), h_ref) < 1e-5
    for k in g_ref:
        assert rel_rms(g[k].double(), g_ref[k]) < 1e-5, k


def test_native_scan_threads_give_identical_results():
    # Tasks are independent and each sums in a fixed order, so the thread count changes nothing.
    inputs = with_gate(mamba1_inputs(2, 50, 130, 4))
    one, two = on_threads(lambda: run_with_grads(lambda **kw: chunk_selective_scan(**kw, backend="native"), inputs))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    for k in one[2]:
        assert torch.equal(one[2][k], two[2][k]), k


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")
def test_native_scan_builds_where_a_compiler_exists():
    # The default path on CPU is the C loop; a silent fallback would hide a broken build.
    assert fused_cpu.status() == "native"


@pytest.fixture
def fresh_native():
    """A cleared library cache (`native.load` memoises per source) around a test that changes the
    environment the build reads; cleared again afterwards so later tests load normally."""
    native.load.cache_clear()
    yield
    native.load.cache_clear()


def test_native_scan_disabled_falls_back(monkeypatch, fresh_native):
    monkeypatch.setenv("TITANFORGE_NATIVE", "0")
    assert not fused_cpu.available()
    inputs = mamba1_inputs(1, 20, 8, 4)
    y_ref, _ = naive_selective_scan(**inputs)
    y, _ = chunk_selective_scan(**inputs)  # auto: the PyTorch path
    assert rel_rms(y, y_ref) < 1e-12
    with pytest.raises(RuntimeError, match="TITANFORGE_NATIVE=0"):
        chunk_selective_scan(**inputs, backend="native")


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")
def test_native_scan_builds_into_a_fresh_cache(monkeypatch, tmp_path, fresh_native):
    # A first build (no cached library) compiles the source into the cache directory and loads it.
    monkeypatch.setenv("TITANFORGE_CACHE_DIR", str(tmp_path))
    assert fused_cpu.available()
    assert len(list((tmp_path / "native").glob("selective_scan-*.so"))) == 1


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")
def test_native_scan_builds_where_the_cache_is_read_only(monkeypatch, tmp_path, fresh_native):
    # A cache directory that cannot be created (a file stands in its way) falls back to the temp dir.
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TITANFORGE_CACHE_DIR", str(blocker))
    assert fused_cpu.available()


def test_native_scan_refuses_mixed_dtypes():
    # Raw pointers of a float64 B in a float32 scan would be read as garbage: the wrapper refuses.
    inputs = {k: v.float() for k, v in mamba1_inputs(1, 10, 8, 4).items()}
    with pytest.raises(ValueError, match="one dtype, float32 or float64"):
        fused_cpu.fused_selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"].double(), inputs["C"])


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")
def test_a_library_that_builds_but_cannot_load_falls_back(monkeypatch, tmp_path, fresh_native):
    # An unresolved symbol links (-shared) but fails at load: the caller gets None and the reason,
    # so ops take their PyTorch path instead of raising OSError from deep inside a step.
    monkeypatch.setenv("TITANFORGE_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "broken.c"
    source.write_text("extern void titanforge_missing_symbol(void);\nvoid f(void) { titanforge_missing_symbol(); }\n")
    with pytest.warns(UserWarning, match="loading broken-.*failed"):
        assert native.load(str(source)) is None
    assert "titanforge_missing_symbol" in native.native_status(str(source))
