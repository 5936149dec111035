"""Titans models: the memory layer against the float64 token loop, attention masks against an
explicit per-query loop, MAC's segment loop against a per-token reference, causality of every
variant, meta-device build, and config errors."""

import math

import pytest
import torch

from testutil.kernel_util import rel_rms
from titanforge.kernels.titans_memory import naive_titans_memory
from titanforge.kernels.titans_memory.naive import mlp_forward
from titanforge.models.config import ModelConfig
from titanforge.models.registry import build_model
from titanforge.models.titans import attention as tattn
from titanforge.models.titans import memory as tmemory
from titanforge.models.titans.config import TitansConfig

VOCAB = 61


def make_cfg(variant, **kw):
    t = dict(variant=variant, chunk_size=4, segment_len=8, window=6, n_persistent=2)
    t.update(kw)
    return ModelConfig(family="titans", vocab_size=VOCAB, d_model=30, n_layers=2, n_heads=3, max_seq_len=128,
                       titans=TitansConfig(**t))


def perturb(model):
    """Move gates and norms off their init values so every path carries signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("variant,extra", [("mac", {}), ("mag", {"gate_granularity": 2}), ("mal", {}),
                                           ("lmm", {"memory_depth": 1})])
def test_forward_is_causal(variant, extra):
    model = build_model(make_cfg(variant, **extra)).double()
    perturb(model)
    tokens = torch.randint(0, VOCAB, (2, 37))
    base = model(tokens)
    assert base.shape == (2, 37, VOCAB)
    for t in (0, 13, 36):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"logits before {t} changed"
        assert (out[:, t] - base[:, t]).abs().max() > 0


def test_memory_layer_matches_naive_op_forward_and_grads(monkeypatch):
    cfg = make_cfg("lmm", chunk_size=5, memory_depth=2)
    layer = tmemory.NeuralMemory(cfg.d_model, cfg.n_heads, cfg.titans).double()
    layer.init_weights()
    perturb(layer)
    x = torch.randn(2, 63, cfg.d_model, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.parameters()]
    out, (W, S) = layer(x)
    g_c = torch.autograd.grad(out.square().sum() + sum(w.sum() for w in W), params)

    def naive(q, k, v, theta, eta, alpha, *, weights, momentum, chunk_size, activation, compile=False, read_after=None,
              **memory_kw):
        o, state = naive_titans_memory(q, k, v, theta, eta, alpha, weights=weights, momentum=momentum,
                                       chunk_size=chunk_size, activation=activation, **memory_kw)
        if read_after is None:
            return o, state
        return o, state, mlp_forward(state[0], read_after.transpose(1, 2), activation).transpose(1, 2)

    monkeypatch.setattr(tmemory, "chunk_titans_memory", naive)
    out_n, (W_n, _) = layer(x)
    g_n = torch.autograd.grad(out_n.square().sum() + sum(w.sum() for w in W_n), params)
    assert rel_rms(out, out_n) < 1e-10
    for (name, _), a, b in zip([("x", x), *layer.named_parameters()], g_c, g_n):
        assert rel_rms(a, b) < 1e-9, name


def test_gate_granularity_pools_logits_within_blocks():
    cfg = make_cfg("lmm", gate_granularity=4)
    layer = tmemory.NeuralMemory(cfg.d_model, cfg.n_heads, cfg.titans)
    layer.init_weights()
    x = torch.randn(2, 10, cfg.d_model)
    theta, _, _ = layer.gates(x)
    logits = layer.w_theta(x)
    for s in range(0, 10, 4):
        expect = cfg.titans.theta_max * torch.sigmoid(logits[:, s:s + 4].mean(1))
        assert torch.allclose(theta[:, s:s + 4], expect[:, None].expand_as(theta[:, s:s + 4]), atol=1e-6)


@pytest.mark.parametrize("granularity", [1, 4])
def test_fused_projection_equals_separate_projections_across_pieces(granularity):
    """project(x, cache, update_projection()) (one matmul, one fused conv + SiLU) equals query +
    keys_values + gates, also when a second piece continues the first through the conv cache;
    outputs and the gradients of x and every parameter, float64."""
    cfg = make_cfg("lmm", gate_granularity=granularity)
    torch.manual_seed(0)
    layer = tmemory.NeuralMemory(cfg.d_model, cfg.n_heads, cfg.titans).double()
    layer.init_weights()
    with torch.no_grad():
        for c in (layer.conv_q, layer.conv_k, layer.conv_v):
            c.weight.normal_()
    x = torch.randn(2, 13, cfg.d_model, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.parameters()]

    def run(fused):
        outs, cache = [], None
        for piece in x.split([8, 5], 1):
            q, k, v, gates, cache = layer.project(piece, cache, layer.update_projection() if fused else None)
            outs += [q, k, v, *gates]
        return outs
    ref, got = run(False), run(True)
    g = torch.Generator().manual_seed(1)
    probes = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in ref]
    grads = [torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, out)), params, allow_unused=True)
             for out in (ref, got)]
    for a, b in zip(got, ref):
        assert rel_rms(a, b) < 1e-12
    for name, a, b in zip(["x", *(n for n, _ in layer.named_parameters())], *grads[::-1]):
        if b is None:  # memory weights, out_norm, w_gate, wo: not read by project
            assert a is None, name
            continue
        assert b.abs().max() > 0 and rel_rms(a, b) < 1e-12, name


def loop_attention(q, k, v, allowed):
    """Per-query softmax over the keys `allowed(i, j)` says it may see; float64."""
    out = torch.zeros_like(q)
    for i in range(q.shape[1]):
        js = [j for j in range(k.shape[1]) if allowed(i, j)]
        s = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, js]) / math.sqrt(q.shape[-1])
        out[:, i] = torch.einsum("bhj,bjhd->bhd", s.softmax(-1), v[:, js])
    return out


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind", ["window", "mac"])
def test_masks_match_loop_reference_and_flex(kind):
    P, W, L = 3, 5, 11
    if kind == "window":
        Tq, Tkv, mod = 23, 23 + P, tattn.sliding_window_mask_mod(P, W)
        allowed = lambda i, j: j < P or (i - W < j - P <= i)  # noqa: E731
    else:
        Tq, Tkv, mod = L, P + 2 * L, tattn.mac_mask_mod(P, L)
        allowed = lambda i, j: j < P or (j - P <= i if j < P + L else j - P - L <= i)  # noqa: E731
    q, k, v = (torch.randn(2, n, 2, 8, dtype=torch.float64) for n in (Tq, Tkv, Tkv))
    ref = loop_attention(q, k, v, allowed)
    assert rel_rms(tattn.masked_attention(q, k, v, mod, use_flex=False), ref) < 1e-12
    if tattn.flex_attention is not None:
        # flex_attention runs forward-only on CPU; checks the same mask_mod drives both paths.
        with torch.no_grad():
            flex = tattn.masked_attention(q.float(), k.float(), v.float(), mod, use_flex=True)
        assert rel_rms(flex.double(), ref) < 1e-5


def reference_mac_mixer(block, h, freqs):
    """MAC by tokens: token t's output from explicit loops, the memory through the naive op."""
    mem, att, P = block.memory, block.attention, block.tcfg.n_persistent
    seg_len, (B, T, _) = block.tcfg.segment_len, h.shape
    q_x, _ = mem.query(h)
    state = mem.initial_state()
    caches = [None, None, None]
    out = []
    for s in range(0, T, seg_len):
        seg = h[:, s:s + seg_len]
        L = seg.shape[1]
        retrieved = mem.read_out(naive_memory_read(q_x[:, s:s + L], state[0], mem), seg)
        heads = lambda z: z.view(B, z.shape[1], -1, att.head_dim)  # noqa: E731
        from titanforge.models.common import apply_rope
        q = apply_rope(heads(att.wq(seg)), freqs[:L])
        k = torch.cat([heads(att.wk(att.persistent).expand(B, P, -1)),
                       apply_rope(heads(att.wk(retrieved)), freqs[:L]), apply_rope(heads(att.wk(seg)), freqs[:L])], 1)
        v = torch.cat([heads(att.wv(att.persistent).expand(B, P, -1)), heads(att.wv(retrieved)), heads(att.wv(seg))], 1)
        allowed = lambda i, j: j < P or (j - P <= i if j < P + L else j - P - L <= i)  # noqa: E731
        y = att.wo(loop_attention(q, k, v, allowed).flatten(2))
        q_y, caches[0] = mem.query(y, caches[0])
        k_y, v_y, (caches[1], caches[2]) = mem.keys_values(y, (caches[1], caches[2]))
        o, state = naive_titans_memory(q_y, k_y, v_y, *mem.gates(y), weights=state[0], momentum=state[1],
                                       chunk_size=mem.cfg.chunk_size, activation=mem.cfg.memory_activation,
                                       inner_grad_clip=mem.cfg.inner_grad_clip)
        out.append(y * torch.sigmoid(mem.read_out(o, y)))
    return torch.cat(out, 1)


def naive_memory_read(q, weights, mem):
    from titanforge.kernels.titans_memory.naive import mlp_forward
    return mlp_forward(weights, q.transpose(1, 2), mem.cfg.memory_activation).transpose(1, 2)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-projections", "separate-projections"])
def test_mac_mixer_matches_per_token_reference(fused):
    # fused: the default (h's five projections one matmul, the read's wo folded into the
    # attention's k/v weight); separate: as tensor parallelism runs it
    model = build_model(make_cfg("mac", segment_len=8, chunk_size=4)).double()
    perturb(model)
    block = model.layers["0"]
    block.memory.fuse_projections = block.attention.fuse_projections = fused
    h = torch.randn(2, 21, 30, dtype=torch.float64, requires_grad=True)
    params = [h, *block.memory.parameters(), *block.attention.parameters()]
    out = block._mac(h, model.freqs.double())
    ref = reference_mac_mixer(block, h, model.freqs.double())
    assert rel_rms(out, ref) < 1e-10
    probe = torch.randn_like(ref)
    g = torch.autograd.grad((out * probe).sum(), params)
    g_ref = torch.autograd.grad((ref * probe).sum(), params)
    for a, b in zip(g, g_ref):
        assert rel_rms(a, b) < 1e-9


def test_meta_build_then_init_and_flops():
    cfg = make_cfg("mac")
    model = build_model(cfg, device="meta")
    assert next(model.parameters()).is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    logits = model(torch.randint(0, VOCAB, (1, 19)))
    assert torch.isfinite(logits).all()
    assert model.flops_per_token(64) > 6 * sum(p.numel() for p in model.layers.parameters()) * 0.5


@pytest.mark.parametrize("bad,match", [
    (dict(variant="xyz"), "variant"),
    (dict(gate_granularity=3), "gate_granularity"),
    (dict(segment_len=10), "segment_len"),
    (dict(memory_depth=0), "memory_depth"),
])
def test_bad_config_raises_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        build_model(make_cfg(bad.pop("variant", "mac"), **bad))


def test_short_conv_matches_conv1d_and_streams():
    """ShortConv's shifted multiply-adds equal a causal depthwise F.conv1d, and the cache continues a stream."""
    conv = tmemory.ShortConv(7, 4).double()
    conv.init_weights()
    x = torch.randn(2, 23, 7, dtype=torch.float64)
    y, _ = conv(x)
    ref = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (3, 0)), conv.weight,
                                     groups=7).transpose(1, 2)
    assert rel_rms(y, ref) < 1e-14
    y1, cache = conv(x[:, :10])
    y2, _ = conv(x[:, 10:], cache)
    assert rel_rms(torch.cat([y1, y2], 1), ref) < 1e-14


def test_mac_with_activation_checkpointing_gives_identical_gradients():
    """Under activation checkpointing the backward recomputes each block (the MAC segment loop, the C
    chain, the fused projections and conv), and the gradients stay bit-identical."""
    import copy

    from titanforge.parallel.data_parallel import apply_activation_checkpointing
    cfg = make_cfg("mac")
    torch.manual_seed(0)
    model = build_model(cfg)
    wrapped = apply_activation_checkpointing(copy.deepcopy(model))
    tokens = torch.randint(0, cfg.vocab_size, (2, 50))
    grads = []
    for m in (model, wrapped):
        m(tokens).square().mean().backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name
