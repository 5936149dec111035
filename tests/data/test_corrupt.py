"""Damaged data: a truncated or garbage shard is skipped (warned, counted once, same stream for
any worker count) or fails naming the shard; a broken manifest names the file and the fix."""

import json
import logging
import os

import numpy as np
import pytest

from titanforge.data import (CorruptShardError, DataConfig, DataError, build_train_loader, build_val_loader,
                             read_manifest)
from titanforge.data.shards import read_shard

BAD = "train/shard-000003.tar"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


def _garbage(path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    # Past the first 512-byte tar header and the .npy header: a token byte.
    data[512 + 200] ^= 0x01
    path.write_bytes(bytes(data))


def _ids(root, split, shard=None):
    m = read_manifest(root)
    entries = [e for e in m["splits"][split]["shards"] if shard is None or e["file"] == shard]
    return {int(i) for e in entries for i in read_shard(root, e, m["sample_len"], m["dtype"])[1]}


def _take(loader, n):
    out = []
    while len(out) < n:
        out += next(loader)["index"].tolist()
    return out[:n]


@pytest.mark.parametrize("damage, verify", [(_truncate, True), (_garbage, True), (_garbage, False),
                                            (_flip_payload_byte, True)])
def test_skip_mode_skips_counts_and_warns(data_copy, damage, verify, caplog):
    train, lost = _ids(data_copy, "train"), _ids(data_copy, "train", BAD)
    damage(data_copy / BAD)
    streams, stats = [], []
    for workers in (0, 2):
        cfg = DataConfig(path=str(data_copy), num_workers=workers, shuffle=False, verify_checksums=verify)
        loader = build_train_loader(cfg, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
        with caplog.at_level(logging.WARNING, logger="titanforge.data"):
            got = _take(loader, len(train) - len(lost))
        assert sorted(got) == sorted(train - lost)
        streams.append(got)
        stats.append(dict(loader.stats))
    assert streams[0] == streams[1]
    # Reported once per encounter, not once per worker.
    for s in stats:
        assert s["corrupt_shards"] == 1 and s["skipped_samples"] == len(lost)
    warned = [r.getMessage() for r in caplog.records if BAD in r.getMessage()]
    assert len(warned) == 2 and all("corrupt shard" in w for w in warned)


def test_ranks_agree_on_skipped_samples(data_copy):
    _truncate(data_copy / BAD)
    cfg = DataConfig(path=str(data_copy))
    alone = build_train_loader(cfg, micro_batch_size=3, dp_rank=0, dp_size=1, seed=4)
    one = [next(alone)["index"].tolist() for _ in range(240)]
    cfg.num_workers = 2
    ranks = [build_train_loader(cfg, micro_batch_size=3, dp_rank=r, dp_size=2, seed=4) for r in range(2)]
    two = [next(ranks[g % 2])["index"].tolist() for g in range(240)]
    assert one == two
    assert alone.stats["corrupt_shards"] == ranks[0].stats["corrupt_shards"] == ranks[1].stats["corrupt_shards"] > 0


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", [_truncate, _garbage])
def test_fail_mode_names_the_shard(data_copy, damage, workers):
    damage(data_copy / BAD)
    cfg = DataConfig(path=str(data_copy), num_workers=workers, on_corrupt="fail", shuffle=False)
    loader = build_train_loader(cfg, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(CorruptShardError, match=r"shard-000003\.tar.*titanforge prepare"):
        _take(loader, 1000)


def test_val_keeps_its_length_when_a_shard_is_skipped(data_copy):
    _truncate(data_copy / "val/shard-000000.tar")
    cfg = DataConfig(path=str(data_copy))
    for rank in range(2):
        val = build_val_loader(cfg, micro_batch_size=2, dp_rank=rank, dp_size=2)
        batches = list(val)
        assert len(batches) == len(val) > 0
        # Every rank reads every shard, so each reports the skip.
        assert val.stats["corrupt_shards"] > 0


def test_all_shards_corrupt_is_an_error_not_a_hang(data_copy):
    for path in (data_copy / "val").glob("*.tar"):
        _garbage(path)
    val = build_val_loader(DataConfig(path=str(data_copy)), micro_batch_size=2, dp_rank=0, dp_size=1)
    with pytest.raises(DataError, match="every shard"):
        list(val)


def _edit_manifest(root, fn):
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("breakage, match", [
    (lambda r: os.remove(r / "manifest.json"), r"manifest\.json does not exist"),
    (lambda r: (r / "manifest.json").write_text('{"format": "titanforge-tok'), r"manifest\.json is not valid JSON"),
    (lambda r: (r / "manifest.json").write_text("[1, 2]"), "is not a titanforge-tokens-v1 manifest"),
    (lambda r: os.remove(r / "train/shard-000002.tar"), r"shard .*train/shard-000002\.tar listed in .* is missing"),
    (lambda r: _edit_manifest(r, lambda m: m.pop("vocab_size")), "lacks vocab_size"),
    (lambda r: _edit_manifest(r, lambda m: m["splits"]["val"]["shards"][0].pop("sha256")), "malformed shard list"),
])
def test_manifest_problems_name_the_file_and_the_fix(data_copy, breakage, match):
    breakage(data_copy)
    with pytest.raises(DataError, match=match) as err:
        read_manifest(data_copy)
    assert f"titanforge prepare --out {data_copy}" in str(err.value)
    with pytest.raises(ValueError, match=match):
        build_train_loader(DataConfig(path=str(data_copy)), micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)


def test_manifest_path_may_be_the_file(prepared):
    assert read_manifest(prepared / "manifest.json")["root"] == str(prepared)
