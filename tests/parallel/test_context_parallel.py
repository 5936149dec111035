"""Context parallelism against one process, with real gloo processes (cp_worker.py).

One 4-rank torchrun launch runs every family (Llama, Titans MAC/MAG/MAL/LMM, TTT-Linear/MLP,
Jamba with Mamba-1, attention and Mamba-2 layers) under cp=4, cp=2 x dp=2 and cp=2 x tp=2 (full
attention zig-zag split), Llama and Jamba also with the contiguous split (cp=4, cp=2 x dp=2), and
with activation checkpointing (cp=4 every family, cp=2 x dp=2 Llama and Jamba), in
float64: the global loss equals the single-process loss to 1e-10 (relative), every parameter's
gradient to 1e-9 (max abs error over max abs value), and 3 AdamW steps' losses to 1e-9. The
attention work per rank (score elements the blockwise attention computes) is equal on every rank
under the zig-zag split and grows as r+1 under the contiguous one. Under
cp=4 every state a rank receives (memory weights and momentum, conv caches, SSM states, TTT inner
weights, sliding-window keys/values) equals the single-process model's state at that position to
1e-12. The layout checks and the blockwise attention that full attention uses under cp (against
causal SDPA over the whole sequence) run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from titanforge.models.config import ModelConfig
from titanforge.parallel import LayoutError, ParallelDims
from titanforge.parallel.config import ParallelConfig
from titanforge.parallel.context import check_context, offset_causal_attention, shard_sequence

WORKER = Path(__file__).with_name("cp_worker.py")
ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["llama", "titans_mac", "titans_mag", "titans_mal", "titans_lmm", "ttt_linear", "ttt_mlp", "jamba"]
LAYOUTS = ["cp4", "cp2_dp2", "cp2_tp2", "cp4_ckpt"]
ATTENTION = ["llama", "jamba"]
ATTENTION_LAYOUTS = ["cp4_contiguous", "cp2_dp2_contiguous", "cp2_dp2_ckpt"]
LOSS_TOL, GRAD_TOL, STATE_TOL = 1e-10, 1e-9, 1e-12


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           "4", str(WORKER), str(out), *FAMILIES], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


CASES = [(f, lay) for lay in LAYOUTS for f in FAMILIES] + [(f, lay) for lay in ATTENTION_LAYOUTS for f in ATTENTION]


@pytest.mark.parametrize("family,layout", CASES)
def test_context_parallel_matches_single_process(results, family, layout):
    name = f"{layout}/{family}"
    for r, res in enumerate(rank[name] for rank in results):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
        assert abs(res["loss"] - res["ref_loss"]) <= LOSS_TOL * abs(res["ref_loss"])
        bad = {k: v for k, v in res["grad_rel"].items() if v == "missing" or v > GRAD_TOL}
        assert not bad, f"rank {r}: gradients differ from one process: {bad}"
        assert len(res["losses"]) == 3
        for lo, ref in zip(res["losses"], res["ref_losses"], strict=True):
            assert abs(lo - ref) <= GRAD_TOL * abs(ref), (res["losses"], res["ref_losses"])


def test_checkpoint_recompute_replays_the_received_states(results):
    """Under activation checkpointing every rank that receives states takes them back from its
    forward's record in the recompute (cp=4: one per hand-off site per layer, every family with a
    hand-off; full attention none: its gathers are collectives that simply run again)."""
    for family in FAMILIES:
        replayed = [rank[f"cp4_ckpt/{family}"]["replayed"] for rank in results]
        plain = [rank[f"cp4/{family}"]["replayed"] for rank in results]
        sites = {"llama": 0, "titans_mag": 4, "titans_mal": 4, "jamba": 2}.get(family, 2)
        assert plain == [0] * 4 and replayed == [0] + [sites] * 3, (family, replayed)


@pytest.mark.parametrize("family", ATTENTION)
def test_zigzag_split_balances_the_attention_work(results, family):
    """Score elements computed per rank in one forward (T = 64, one micro-batch row per call):
    zig-zag, 2 cp + 1 half-piece blocks of c x c (c = T / 2 cp) on every rank; contiguous, r + 1
    blocks of (2c) x (2c), so the last rank does 2 cp - 1 ... (4 at cp = 4) times the first's."""
    layers = {"llama": 2, "jamba": 1}[family]
    for layout, cp in (("cp4", 4), ("cp2_dp2", 2), ("cp2_tp2", 2), ("cp4_ckpt", 4)):
        work = [rank[f"{layout}/{family}"]["attention_scores"] for rank in results]
        c = 64 // (2 * cp)
        assert work == [layers * (2 * cp + 1) * c * c] * 4, (layout, work)
    work = [rank[f"cp4_contiguous/{family}"]["attention_scores"] for rank in results]
    assert work == [layers * (r + 1) * 16 * 16 for r in range(4)], work
    work = [rank[f"cp2_dp2_contiguous/{family}"]["attention_scores"] for rank in results]
    # Mesh dims (dp, cp), cp inner: global ranks 0 and 2 are cp rank 0, ranks 1 and 3 cp rank 1.
    assert work == [layers * (r % 2 + 1) * 32 * 32 for r in range(4)], work


@pytest.mark.parametrize("family", FAMILIES)
def test_received_state_is_the_single_process_state_at_the_boundary(results, family):
    crossing = [rank[f"cp4/{family}"]["crossing"] for rank in results]
    assert crossing[0]["sites"] == 0  # the first rank starts from the initial state
    # Full attention gathers keys and values instead; every other mixer hands a state over per layer
    # (MAG/MAL: two per layer, the window of keys/values and the memory state).
    expected = {"llama": 0, "titans_mag": 4, "titans_mal": 4, "jamba": 2}.get(family, 2)
    for r in range(1, 4):
        assert crossing[r]["sites"] == expected, crossing
        assert crossing[r]["max_rel"] <= STATE_TOL, crossing


def test_pieces_overlap_by_one_token():
    import torch

    tokens = torch.arange(2 * 17).view(2, 17)
    pieces = [shard_sequence(tokens, r, 4) for r in range(4)]
    assert all(p.shape == (2, 5) for p in pieces)
    assert torch.equal(torch.cat([p[:, :-1] for p in pieces], 1), tokens[:, :-1])
    assert torch.equal(torch.cat([p[:, 1:] for p in pieces], 1), tokens[:, 1:])


@pytest.mark.parametrize("B,T,H,G,D,offset,block", [(2, 7, 6, 2, 5, 9, 4), (1, 5, 3, 3, 4, 0, 2),
                                                     (2, 6, 4, 1, 3, 12, 6), (1, 9, 2, 2, 3, 11, 16)])
def test_offset_causal_attention_matches_sdpa_on_the_whole_sequence(B, T, H, G, D, offset, block):
    """The blockwise attention of one rank's queries (positions offset..offset+T-1) over the keys
    up to its end equals those rows of causal SDPA over the whole sequence, output and gradients,
    in float64; blocks misaligned with the diagonal, GQA and a single block included."""
    import torch

    from titanforge.models.common import attention

    g = torch.Generator().manual_seed(offset + block)
    # Keys after the piece's end exist in the reference and must get no gradient from its rows.
    n = offset + T + 3
    q, k, v = (torch.randn(B, n, h, D, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, G, G))
    w = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    want = attention(q, k, v)[:, offset:offset + T]
    got = offset_causal_attention(q[:, offset:offset + T], k[:, :offset + T], v[:, :offset + T], offset, block)
    assert rel(got, want) < 1e-13
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        assert rel(a, b) < 1e-13


def rel(a, b) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _cfg(family, **kw):
    cfg = ModelConfig(family=family)
    for key, val in kw.items():
        setattr(getattr(cfg, family), key, val)
    return cfg


def test_impossible_splits_are_rejected_with_what_fits():
    errs = check_context(_cfg("titans", variant="mac", segment_len=64, chunk_size=16), 4, 128)
    assert len(errs) == 1 and "segment_len=64" in errs[0] and "parallel.cp in [2]" in errs[0]
    assert check_context(_cfg("titans", variant="mac", segment_len=32, chunk_size=16), 4, 128) == []
    errs = check_context(_cfg("ttt", mini_batch_size=16), 2, 48)
    assert len(errs) == 1 and "mini_batch_size=16" in errs[0]
    errs = check_context(_cfg("titans", variant="mag", window=64, chunk_size=16, n_persistent=16), 4, 128)
    assert len(errs) == 1 and "window=64" in errs[0]
    # MAG/MAL's persistent tokens enter the memory: their count must keep its chunk grid on the split.
    errs = check_context(_cfg("titans", variant="mal", chunk_size=16, n_persistent=4), 4, 128)
    assert len(errs) == 1 and "n_persistent=4" in errs[0] and "[0, 16, 32, 48]" in errs[0]
    assert check_context(_cfg("titans", variant="mal", chunk_size=16, n_persistent=16, window=16), 4, 128) == []
    assert check_context(ModelConfig(family="llama"), 3, 64) and not check_context(ModelConfig(family="llama"), 4, 64)
    # The zig-zag split cuts the sequence into 2 cp half-pieces; the contiguous one needs cp only.
    errs = check_context(ModelConfig(family="llama"), 4, 36)
    assert len(errs) == 1 and "2 x parallel.cp = 8" in errs[0] and "cp_split=contiguous" in errs[0]
    assert check_context(ModelConfig(family="llama"), 4, 36, split="contiguous") == []
    errs = check_context(ModelConfig(family="llama"), 2, 64, split="ring")
    assert len(errs) == 1 and "parallel.cp_split='ring'" in errs[0]


def test_layouts_that_do_not_compose_are_rejected():
    with pytest.raises(LayoutError, match="dp_backend=fsdp"):
        ParallelDims.from_config(ParallelConfig(cp=2, tp=2), 4)
    with pytest.raises(LayoutError, match="parallel.pp=1 or parallel.cp=1"):
        ParallelDims.from_config(ParallelConfig(cp=2, pp=2), 4)
    with pytest.raises(LayoutError, match="ep"):
        ParallelDims.from_config(ParallelConfig(cp=2, ep=2), 4)
    assert ParallelDims.from_config(ParallelConfig(cp=2), 4).dp == 2
