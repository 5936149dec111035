"""Fixtures of the data tests: a small synthetic corpus prepared with a locally trained BPE.

Sizes are odd on purpose (seq_len 31, 13 rows per shard, an odd number of training rows) so
that shards, rank blocks, batches and epochs never line up.
"""

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from titanforge.data import prepare_corpus, read_manifest

WORDS = ("the king queen doth thou art night day sword crown love death speak hark anon fair foul "
         "Rome Venice ghost father son storm sea gold honour, grief; mercy! what? sirrah o'er 'tis").split()
SEQ_LEN = 31
SAMPLES_PER_SHARD = 13


def write_corpus(root: Path, n_docs: int = 6, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        lines = []
        for _ in range(rng.randint(40, 90)):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + ".")
        (root / f"play_{d:02d}.txt").write_text(f"THE PLAY OF NUMBER {d}\n\n" + "\n".join(lines) + "\n")
    return root


def expected_stream(corpus: Path, manifest: dict) -> np.ndarray:
    """The token stream prepare should have cut, computed with `tokenizers` directly."""
    tok = HFTokenizer.from_file(str(Path(manifest["root"]) / manifest["tokenizer"]["file"]))
    ids = []
    for i, path in enumerate(sorted(corpus.glob("*.txt"))):
        if i:
            ids.append(manifest["eos_id"])
        ids += tok.encode(path.read_text(), add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int64)


def expected_rows(corpus: Path, manifest: dict) -> np.ndarray:
    """[n_rows, seq_len + 1]: row i = stream[i*T : i*T + T + 1]."""
    stream, T = expected_stream(corpus, manifest), manifest["seq_len"]
    n = (len(stream) - 1) // T
    return np.stack([stream[i * T:i * T + T + 1] for i in range(n)])


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare_corpus(out, corpus=str(corpus), tokenizer="bpe:300", seq_len=SEQ_LEN,
                   samples_per_shard=SAMPLES_PER_SHARD, val_fraction=0.1, seed=0, download=False)
    return out


@pytest.fixture
def data_copy(prepared, tmp_path) -> Path:
    """A private copy of the prepared data, for tests that damage it."""
    return Path(shutil.copytree(prepared, tmp_path / "data"))


@pytest.fixture(scope="session")
def rows(prepared, corpus) -> np.ndarray:
    return expected_rows(corpus, read_manifest(prepared))


@pytest.fixture(scope="session")
def make_corpus():
    """write_corpus(root, n_docs=6, seed=0) -> root, for tests that need their own corpus."""
    return write_corpus


@pytest.fixture(scope="session")
def stream_of():
    """expected_stream(corpus, manifest) -> the token stream, computed without titanforge."""
    return expected_stream
