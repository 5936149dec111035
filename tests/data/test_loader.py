"""Loader: ranks and workers split every epoch exactly, the order does not depend on the worker
count, epochs reshuffle deterministically, and a resumed stream continues with the next unseen
sample. Ranks are simulated in one process by passing dp_rank/dp_size (no process group needed)."""

import logging

import numpy as np
import pytest
import torch

from titanforge.data import DataConfig, DataError, build_train_loader, build_val_loader, prepare_corpus, read_manifest
from titanforge.data.shards import read_shard


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def _take(loader, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The next n_samples (index, tokens) of a loader, cutting the last batch."""
    index, tokens = [], []
    while sum(len(i) for i in index) < n_samples:
        batch = next(loader)
        index.append(batch["index"].numpy())
        tokens.append(batch["tokens"].numpy())
    return np.concatenate(index)[:n_samples], np.concatenate(tokens)[:n_samples]


def _train_ids(path) -> set:
    m = read_manifest(path)
    return {int(i) for e in m["splits"]["train"]["shards"] for i in read_shard(path, e, m["sample_len"], m["dtype"])[1]}


def test_batches_are_token_rows(prepared, rows):
    loader = build_train_loader(_cfg(prepared), micro_batch_size=5, dp_rank=0, dp_size=1, seed=0)
    batch = next(loader)
    assert batch["tokens"].dtype == torch.int64 and batch["index"].dtype == torch.int64
    assert tuple(batch["tokens"].shape) == (5, 32) and tuple(batch["index"].shape) == (5,)
    np.testing.assert_array_equal(batch["tokens"].numpy(), rows[batch["index"].numpy()])


def test_ranks_and_workers_cover_each_sample_once_per_epoch(prepared, rows):
    train = _train_ids(prepared)
    n, dp, B = len(train), 2, 4
    orders = {}
    for workers in (0, 1, 2):
        covered = []
        for rank in range(dp):
            # cache_mb=0 for one worker count: shards are re-read rather than kept.
            cfg = _cfg(prepared, num_workers=workers, cache_mb=0 if workers == 1 else 256)
            loader = build_train_loader(cfg, micro_batch_size=B, dp_rank=rank, dp_size=dp, seed=7)
            assert loader.samples_per_epoch == n // dp
            index, tokens = _take(loader, n // dp)
            np.testing.assert_array_equal(tokens, rows[index])
            orders[workers, rank] = index
            covered += index.tolist()
        # Each sample at most once; only the N mod dp samples at the end of the order are left out.
        assert len(covered) == len(set(covered)) == n - n % dp and set(covered) <= train
    for workers in (1, 2):
        for rank in range(dp):
            np.testing.assert_array_equal(orders[workers, rank], orders[0, rank])


def test_epochs_reshuffle_deterministically(prepared):
    n = len(_train_ids(prepared))
    a = build_train_loader(_cfg(prepared), micro_batch_size=7, dp_rank=0, dp_size=1, seed=3)
    b = build_train_loader(_cfg(prepared), micro_batch_size=7, dp_rank=0, dp_size=1, seed=3)
    c = build_train_loader(_cfg(prepared), micro_batch_size=7, dp_rank=0, dp_size=1, seed=4)
    ea, eb, ec = _take(a, 3 * n)[0], _take(b, 3 * n)[0], _take(c, n)[0]
    np.testing.assert_array_equal(ea, eb)
    epochs = ea.reshape(3, n)
    for e in epochs:
        assert sorted(e.tolist()) == sorted(epochs[0].tolist())
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(ec, epochs[0])
    assert a.epoch == 3 and a.state_dict()["epoch"] == 3
    fixed = build_train_loader(_cfg(prepared, shuffle=False), micro_batch_size=7, dp_rank=0, dp_size=1, seed=3)
    f = _take(fixed, 2 * n)[0].reshape(2, n)
    np.testing.assert_array_equal(f[0], f[1])


@pytest.mark.parametrize("before, after", [(2, 0), (0, 2), (1, 2)])
def test_resume_continues_with_the_next_unseen_sample(prepared, before, after):
    n = len(_train_ids(prepared))
    kw = dict(dp_rank=1, dp_size=2, seed=5)
    first = build_train_loader(_cfg(prepared, num_workers=before), micro_batch_size=6, **kw)
    # 27 batches of 6 = 162 samples: past the end of epoch 0 (152 per rank), mid-shard, mid-worker-cycle.
    seen = _take(first, 27 * 6)[0]
    state = first.state_dict()
    assert state["position"] == 27 * 6 and state["epoch"] == 1
    reference = _take(first, 60)[0]

    resumed = build_train_loader(_cfg(prepared, num_workers=after, cache_mb=0), micro_batch_size=6, **kw)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(_take(resumed, 60)[0], reference)
    # The micro-batch size may change too: the position counts samples.
    other = build_train_loader(_cfg(prepared, num_workers=after), micro_batch_size=4, **kw)
    other.load_state_dict(state)
    np.testing.assert_array_equal(_take(other, 60)[0], reference)
    # Nothing of the resumed part of epoch 1 was seen in epoch 1 before the checkpoint.
    per_rank = n // 2
    assert not set(seen[per_rank:].tolist()) & set(reference.tolist())


def test_resume_refuses_other_data_and_rescales_other_dp(prepared, data_copy, corpus, tmp_path, caplog):
    loader = build_train_loader(_cfg(prepared), micro_batch_size=4, dp_rank=0, dp_size=2, seed=0)
    _take(loader, 40)
    state = loader.state_dict()
    other = prepare_corpus(tmp_path / "other", corpus=str(corpus), tokenizer="bpe:300", seq_len=31,
                           samples_per_shard=13, val_fraction=0.1, seed=9)
    elsewhere = build_train_loader(_cfg(other["root"]), micro_batch_size=4, dp_rank=0, dp_size=2, seed=0)
    with pytest.raises(ValueError, match="belongs to other data"):
        elsewhere.load_state_dict(state)
    # The same data copied elsewhere is the same data.
    moved = build_train_loader(_cfg(data_copy), micro_batch_size=4, dp_rank=0, dp_size=2, seed=0)
    moved.load_state_dict(state)
    assert moved.position == 40
    wider = build_train_loader(_cfg(prepared), micro_batch_size=4, dp_rank=0, dp_size=4, seed=0)
    with caplog.at_level(logging.WARNING, logger="titanforge.data"):
        wider.load_state_dict(state)
    assert "not sample-exact" in caplog.text
    assert wider.position == 40 * wider.samples_per_epoch // loader.samples_per_epoch
    with pytest.raises(ValueError, match="lacks"):
        wider.load_state_dict({"position": 3})


def test_val_loader_is_finite_equal_across_ranks_and_repeatable(prepared):
    m = read_manifest(prepared)
    n_val = m["splits"]["val"]["samples"]
    seen = []
    lengths = []
    for rank in range(3):
        val = build_val_loader(_cfg(prepared, num_workers=2), micro_batch_size=3, dp_rank=rank, dp_size=3)
        first = [b["index"].numpy() for b in val]
        again = [b["index"].numpy() for b in val]
        assert len(first) == len(val) == (n_val // 3) // 3
        np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
        lengths.append(len(val))
        seen += np.concatenate(first).tolist()
    assert len(set(lengths)) == 1 and len(seen) == len(set(seen))
    assert not set(seen) & _train_ids(prepared)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dp_rank=2, dp_size=2), "0 <= dp_rank < dp_size"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(seed=-3), "seed"),
    (dict(dp_size=10_000, dp_rank=0), "fewer than dp_size"),
])
def test_bad_loader_arguments(prepared, kwargs, match):
    args = dict(micro_batch_size=2, dp_rank=0, dp_size=1, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        build_train_loader(_cfg(prepared), **args)


def test_bad_config_values(prepared):
    with pytest.raises(ValueError, match="on_corrupt"):
        build_train_loader(_cfg(prepared, on_corrupt="ignore"), micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(DataError, match="fewer than micro_batch_size"):
        build_val_loader(_cfg(prepared), micro_batch_size=1000, dp_rank=0, dp_size=1)


def test_rank_order_reshuffles_shards_and_rows_per_epoch():
    from titanforge.data.order import RankOrder
    a, b = RankOrder([13, 13, 7], 0, 1, seed=2, shuffle=True), RankOrder([13, 13, 7], 0, 1, seed=2, shuffle=True)
    epochs = [[a.row_order(e, s).tolist() for s in range(3)] + [a.shard_order(e).tolist()] for e in range(4)]
    assert epochs == [[b.row_order(e, s).tolist() for s in range(3)] + [b.shard_order(e).tolist()] for e in range(4)]
    for s in range(3):
        assert len({tuple(ep[s]) for ep in epochs}) == 4
        assert all(sorted(ep[s]) == list(range(a.sizes[s])) for ep in epochs)
    assert len({tuple(ep[3]) for ep in epochs}) > 1


def test_shard_cache_reads_fitting_data_once(prepared, monkeypatch):
    import titanforge.data.stream as stream
    reads = []
    real = stream.read_shard

    def counting(root, entry, *args):
        reads.append(entry["file"])
        return real(root, entry, *args)

    monkeypatch.setattr(stream, "read_shard", counting)
    n_shards = len(read_manifest(prepared)["splits"]["train"]["shards"])
    n = len(_train_ids(prepared))
    for cache_mb, low, high in ((256, n_shards, n_shards), (0, 3 * n_shards - 4, 3 * n_shards)):
        reads.clear()
        loader = build_train_loader(_cfg(prepared, cache_mb=cache_mb), micro_batch_size=5, dp_rank=0, dp_size=1,
                                    seed=0)
        _take(loader, 3 * n)
        # Without a cache budget the two latest shards are still kept: at each of the two epoch
        # boundaries the next epoch may start with them.
        assert low <= len(reads) <= high and len(set(reads)) == n_shards
