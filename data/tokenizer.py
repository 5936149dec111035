"""Tokenizers for `prepare`: GPT-2's BPE through tiktoken, a local BPE trained with `tokenizers`,
or any local tiktoken BPE file / Hugging Face `tokenizer.json`.

Every tokenizer is a file: `prepare` copies it next to the shards (`tokenizer.tiktoken` or
`tokenizer.json`) and records its sha256 in the manifest, so a prepared dataset can always be
decoded and its tokenizer identified. Documents are encoded as plain text: a literal
"<|endoftext|>" inside a document stays text and never becomes the EOS id.

Specs: "gpt2" | "bpe:<vocab size>" (byte-level BPE trained on the corpus, deterministic) | a path.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from titanforge.data.sources import gpt2_bpe_file, sha256_file

EOS_TOKEN = "<|endoftext|>"
# GPT-2's split pattern (tiktoken's r50k_base); cl100k files need their own pattern.
R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
              r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
# EOS candidates looked up in a tokenizer.json, in order.
HF_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")


@dataclass
class Tokenizer:
    spec: str
    # "tiktoken" (a BPE ranks file) | "hf" (a tokenizers JSON file).
    kind: str
    path: Path
    sha256: str
    vocab_size: int
    eos_id: int
    eos_token: str
    _impl: Any = None

    def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "tiktoken":
            return self._impl.encode_ordinary_batch(list(texts))
        return [e.ids for e in self._impl.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "tiktoken":
            return self._impl.decode(ids)
        return self._impl.decode(ids, skip_special_tokens=False)

    @property
    def file_name(self) -> str:
        return "tokenizer.tiktoken" if self.kind == "tiktoken" else "tokenizer.json"

    def manifest(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "file": self.file_name, "sha256": self.sha256,
                "vocab_size": self.vocab_size, "eos_id": self.eos_id, "eos_token": self.eos_token}

    def save(self, out_dir: Path) -> Path:
        dest = Path(out_dir) / self.file_name
        if self.path.resolve() != dest.resolve():
            shutil.copyfile(self.path, dest)
        return dest


def load_tiktoken_file(path: str | Path, spec: str | None = None) -> Tokenizer:
    path = Path(path)
    sha = sha256_file(path)
    try:
        # expected_hash makes tiktoken's path-keyed temp cache re-read a file that changed.
        ranks = load_tiktoken_bpe(str(path), expected_hash=sha)
    except Exception as e:  # tiktoken raises bare ValueError/binascii.Error on a malformed line
        raise ValueError(f"tokenizer file {path} is not a tiktoken BPE file (base64 token, space, rank per "
                         f"line) nor a tokenizer.json: {e}") from None
    n = len(ranks)
    pattern = CL100K_PAT if n == 100256 else R50K_PAT
    enc = tiktoken.Encoding(name=f"titanforge-{sha[:12]}", pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens={EOS_TOKEN: n})
    return Tokenizer(spec or str(path), "tiktoken", path, sha, enc.n_vocab, n, EOS_TOKEN, enc)


def load_hf_file(path: str | Path, spec: str | None = None) -> Tokenizer:
    path = Path(path)
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a bad JSON
        raise ValueError(f"tokenizer file {path} is not a Hugging Face tokenizer.json: {e}") from None
    for token in HF_EOS_TOKENS:
        eos = tok.token_to_id(token)
        if eos is not None:
            break
    else:
        raise ValueError(f"tokenizer {path} has none of the end-of-text tokens {HF_EOS_TOKENS}; add one as a "
                         f"special token (documents are joined with it)")
    return Tokenizer(spec or str(path), "hf", path, sha256_file(path), tok.get_vocab_size(with_added_tokens=True),
                     eos, token, tok)


def train_bpe(texts: Sequence[str], vocab_size: int, out_path: Path) -> Tokenizer:
    """Byte-level BPE on `texts` with EOS as id 0; the same texts give the same file."""
    if vocab_size < 257 + 1:
        raise ValueError(f"bpe:{vocab_size} is too small: a byte-level BPE needs 256 byte tokens + EOS; "
                         f"use bpe:512 or more")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return load_hf_file(out_path, spec=f"bpe:{vocab_size}")


def resolve_tokenizer(spec: str, *, cache: Path, texts: Sequence[str], work_dir: Path,
                      download: bool = True) -> Tokenizer:
    """The tokenizer a spec names; `texts` train a "bpe:N" tokenizer, saved under `work_dir`."""
    if spec == "gpt2":
        return load_tiktoken_file(gpt2_bpe_file(cache, download), spec="gpt2")
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit():
            raise ValueError(f"tokenizer {spec!r}: the vocabulary size after 'bpe:' must be an integer, e.g. bpe:8192")
        return train_bpe(texts, int(size), Path(work_dir) / "tokenizer.json")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"tokenizer {spec!r} is not 'gpt2', 'bpe:N' or an existing file (tiktoken BPE file or "
                         f"tokenizer.json)")
    head = path.read_bytes()[:1].lstrip()
    return load_hf_file(path, spec) if path.suffix == ".json" or head == b"{" else load_tiktoken_file(path, spec)


def load_tokenizer(manifest: dict) -> Tokenizer:
    """The tokenizer a prepared dataset was made with (from its copy beside the shards)."""
    info = manifest["tokenizer"]
    path = Path(manifest["root"]) / info["file"]
    if not path.is_file() or sha256_file(path) != info["sha256"]:
        raise ValueError(f"{path} is missing or differs from the one the data was prepared with; "
                         f"re-run `titanforge prepare --out {manifest['root']}`")
    load = load_tiktoken_file if info["kind"] == "tiktoken" else load_hf_file
    return load(path, spec=info["spec"])

