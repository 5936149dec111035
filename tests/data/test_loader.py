"""Loader: ranks and workers split every epoch exactly, the global batches do not depend on the
rank or worker count, epochs reshuffle deterministically, and a resumed stream continues with the
next unseen samples. Ranks are simulated in one process by passing dp_rank/dp_size."""

import logging

import numpy as np
import pytest
import torch

from titanforge.data import DataConfig, DataError, build_train_loader, build_val_loader, prepare_corpus, read_manifest
from titanforge.data.order import GlobalOrder
from titanforge.data.shards import read_shard


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def _batches(loader, n: int) -> list[np.ndarray]:
    return [next(loader)["index"].numpy() for _ in range(n)]


def _take(loader, n_samples: int) -> np.ndarray:
    """The source row ids of the next n_samples of a loader, cutting the last batch."""
    out = []
    while sum(map(len, out)) < n_samples:
        out.append(next(loader)["index"].numpy())
    return np.concatenate(out)[:n_samples]


def _global(path, n_batches: int, dp: int, workers: int = 0, start: dict | None = None, **kw) -> np.ndarray:
    """The first n_batches global micro-batches of a dp-rank job: rank batches interleaved."""
    per_rank = []
    for rank in range(dp):
        loader = build_train_loader(_cfg(path, num_workers=workers), dp_rank=rank, dp_size=dp, **kw)
        if start is not None:
            loader.load_state_dict(start)
        per_rank.append(_batches(loader, n_batches // dp))
    return np.stack([per_rank[g % dp][g // dp] for g in range(n_batches)])


def _train_ids(path) -> set:
    m = read_manifest(path)
    return {int(i) for e in m["splits"]["train"]["shards"] for i in read_shard(path, e, m["sample_len"], m["dtype"])[1]}


def test_batches_are_token_rows(prepared, rows):
    loader = build_train_loader(_cfg(prepared), micro_batch_size=5, dp_rank=0, dp_size=1, seed=0)
    batch = next(loader)
    assert batch["tokens"].dtype == torch.int64 and batch["index"].dtype == torch.int64
    assert tuple(batch["tokens"].shape) == (5, 32) and tuple(batch["index"].shape) == (5,)
    np.testing.assert_array_equal(batch["tokens"].numpy(), rows[batch["index"].numpy()])


def test_ranks_and_workers_deal_out_one_global_order(prepared, rows):
    train = _train_ids(prepared)
    n, B = len(train), 4
    n_batches = 2 * (n // (2 * B) + 1)  # a little more than one epoch, a whole number of rank pairs
    one = _global(prepared, n_batches, dp=1, micro_batch_size=B, seed=7)
    # The first epoch: every training sample exactly once.
    assert sorted(one.reshape(-1)[:n].tolist()) == sorted(train)
    for dp, workers in ((2, 0), (2, 1), (2, 2), (3, 2)):
        batches = n_batches - n_batches % dp
        np.testing.assert_array_equal(_global(prepared, batches, dp, workers, micro_batch_size=B, seed=7),
                                      one[:batches])
    # Tokens belong to their ids, also through worker processes and without a shard cache.
    loader = build_train_loader(_cfg(prepared, num_workers=2, cache_mb=0), micro_batch_size=B, dp_rank=1, dp_size=2,
                                seed=7)
    for _ in range(5):
        batch = next(loader)
        np.testing.assert_array_equal(batch["tokens"].numpy(), rows[batch["index"].numpy()])


def test_epochs_reshuffle_deterministically(prepared):
    n = len(_train_ids(prepared))
    a = build_train_loader(_cfg(prepared), micro_batch_size=7, dp_rank=0, dp_size=1, seed=3)
    b = build_train_loader(_cfg(prepared), micro_batch_size=7, dp_rank=0, dp_size=1, seed=3)
    c = build_train_loader(_cfg(prepared), micro_batch_size=7, dp_rank=0, dp_size=1, seed=4)
    ea, eb, ec = _take(a, 3 * n), _take(b, 3 * n), _take(c, n)
    np.testing.assert_array_equal(ea, eb)
    epochs = ea.reshape(3, n)
    for e in epochs:
        assert sorted(e.tolist()) == sorted(epochs[0].tolist())
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(ec, epochs[0])
    assert a.epoch == 3 and a.state_dict()["epoch"] == 3
    fixed = build_train_loader(_cfg(prepared, shuffle=False), micro_batch_size=7, dp_rank=0, dp_size=1, seed=3)
    f = _take(fixed, 2 * n).reshape(2, n)
    np.testing.assert_array_equal(f[0], f[1])


def test_global_order_reshuffles_shards_and_rows_per_epoch():
    a, b = GlobalOrder([13, 13, 7], seed=2, shuffle=True), GlobalOrder([13, 13, 7], seed=2, shuffle=True)
    epochs = [[a.row_order(e, s).tolist() for s in range(3)] + [a.shard_order(e).tolist()] for e in range(4)]
    assert epochs == [[b.row_order(e, s).tolist() for s in range(3)] + [b.shard_order(e).tolist()] for e in range(4)]
    for s in range(3):
        assert len({tuple(ep[s]) for ep in epochs}) == 4
        assert all(sorted(ep[s]) == list(range(a.sizes[s])) for ep in epochs)
    assert len({tuple(ep[3]) for ep in epochs}) > 1
    # Segments from an offset cover exactly the rest of the epoch.
    assert sum(hi - lo for _, lo, hi in a.segments(1, offset=20)) == 33 - 20


@pytest.mark.parametrize("before, after", [(2, 0), (0, 2), (1, 2)])
def test_resume_continues_with_the_next_unseen_samples(prepared, before, after):
    n = len(_train_ids(prepared))
    kw = dict(dp_rank=1, dp_size=2, seed=5)
    first = build_train_loader(_cfg(prepared, num_workers=before), micro_batch_size=6, **kw)
    # 27 batches of 6 on each of 2 ranks = 324 samples: past the end of epoch 0, mid-shard, mid-worker-cycle.
    _batches(first, 27)
    state = first.state_dict()
    assert state["position"] == 27 * 2 * 6 and state["epoch"] == 1
    reference = np.concatenate(_batches(first, 10))

    resumed = build_train_loader(_cfg(prepared, num_workers=after, cache_mb=0), micro_batch_size=6, **kw)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(np.concatenate(_batches(resumed, 10)), reference)
    # The global stream from the saved position, as one process sees it: rank 1 took every
    # second micro-batch of it.
    alone = build_train_loader(_cfg(prepared), micro_batch_size=6, dp_rank=0, dp_size=1, seed=5)
    alone.load_state_dict(state)
    stream = np.stack(_batches(alone, 20))
    np.testing.assert_array_equal(np.concatenate(stream[1::2]), reference)
    # Nothing after the position was seen in its epoch before it.
    everything = _take(build_train_loader(_cfg(prepared), micro_batch_size=6, dp_rank=0, dp_size=1, seed=5),
                       state["position"])
    assert not set(everything[n:].tolist()) & set(stream.reshape(-1).tolist())


def test_resume_on_another_dp_size_and_micro_batch_is_exact(prepared):
    kw = dict(micro_batch_size=4, seed=1)
    ranks = [build_train_loader(_cfg(prepared), dp_rank=r, dp_size=2, **kw) for r in range(2)]
    for loader in ranks:
        _batches(loader, 9)
    states = [loader.state_dict() for loader in ranks]
    assert states[0]["position"] == states[1]["position"] == 9 * 2 * 4
    # Continue on 3 ranks with micro-batches of 2: the same global stream from the same position.
    three = _global(prepared, 12, dp=3, start=states[1], micro_batch_size=2, seed=1)
    alone = build_train_loader(_cfg(prepared), dp_rank=0, dp_size=1, **kw)
    alone.load_state_dict(states[0])
    np.testing.assert_array_equal(three.reshape(-1), _take(alone, 24))


def test_resume_refuses_other_data_and_warns_on_another_seed(prepared, data_copy, corpus, tmp_path, caplog):
    loader = build_train_loader(_cfg(prepared), micro_batch_size=4, dp_rank=0, dp_size=2, seed=0)
    _batches(loader, 5)
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
    reseeded = build_train_loader(_cfg(prepared), micro_batch_size=4, dp_rank=0, dp_size=2, seed=1)
    with caplog.at_level(logging.WARNING, logger="titanforge.data"):
        reseeded.load_state_dict(state)
    assert "not sample-exact" in caplog.text and reseeded.position == 40
    with pytest.raises(ValueError, match="lacks"):
        reseeded.load_state_dict({"position": 3})


def test_val_loader_is_finite_equal_across_ranks_and_repeatable(prepared):
    n_val = read_manifest(prepared)["splits"]["val"]["samples"]
    seen, lengths = [], []
    for rank in range(3):
        val = build_val_loader(_cfg(prepared, num_workers=2), micro_batch_size=3, dp_rank=rank, dp_size=3)
        first = [b["index"].numpy() for b in val]
        again = [b["index"].numpy() for b in val]
        assert len(first) == len(val) == n_val // 9
        np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
        lengths.append(len(val))
        seen += np.concatenate(first).tolist()
    assert len(set(lengths)) == 1 and len(seen) == len(set(seen))
    assert not set(seen) & _train_ids(prepared)


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


@pytest.mark.parametrize("kwargs, match", [
    (dict(dp_rank=2, dp_size=2), "0 <= dp_rank < dp_size"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(seed=-3), "seed"),
])
def test_bad_loader_arguments(prepared, kwargs, match):
    args = dict(micro_batch_size=2, dp_rank=0, dp_size=1, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        build_train_loader(_cfg(prepared), **args)


def test_bad_config_values(prepared):
    with pytest.raises(ValueError, match="on_corrupt"):
        build_train_loader(_cfg(prepared, on_corrupt="ignore"), micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(ValueError, match="cache_mb"):
        build_train_loader(_cfg(prepared, cache_mb=-1), micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(DataError, match="fewer than micro_batch_size"):
        build_val_loader(_cfg(prepared), micro_batch_size=1000, dp_rank=0, dp_size=1)
