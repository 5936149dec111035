"""On-disk format of a prepared dataset: webdataset `.tar` shards of token rows plus `manifest.json`.

    <out>/manifest.json            counts, tokenizer identity and hash, source hash, shard list
    <out>/tokenizer.{tiktoken,json}
    <out>/train/shard-000000.tar   members "<shard>-<chunk>.tokens.npy" ([rows, seq_len + 1] uint16/32)
    <out>/val/shard-000000.tar               "<shard>-<chunk>.index.npy"  ([rows] int64 source row ids)

The tokens of a shard are one tar member (up to ROWS_PER_MEMBER rows) rather than one member per
sample, and the loader takes members as zero-copy slices of the file's bytes found through the tar
headers (tarfile, random access) and decodes them with np.frombuffer. webdataset's own reader
streams each member through 10 KB copies and numpy parses every .npy header with ast; together
with per-sample members that cost more than the rest of the loader (bench/data_loader.py). Any
webdataset reader still opens the shards: `wds.WebDataset(url).decode()` gives the arrays, keyed
by webdataset's "<key>.<ext>" convention. Shards are written with mtime 0 and a fixed owner, so
the same inputs give byte-identical shards; the manifest records each shard's size and sha256
(tar itself has no payload checksum), which the loader checks: the size on every read, the hash
the first time each process reads the shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext

FORMAT = "titanforge-tokens-v1"
# 2 MB of uint16 tokens at seq_len 256; a default shard (1024 rows) is one member.
ROWS_PER_MEMBER = 4096
SPLITS = ("train", "val")
PREPARE_HINT = "re-run `titanforge prepare --out {root}`"


class DataError(ValueError):
    """A prepared dataset is missing or inconsistent; the message names the file and the fix."""


class CorruptShardError(DataError):
    """A shard cannot be read back as the manifest describes it (truncated, garbage, altered)."""


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# Parsed .npy headers by their bytes: numpy parses a header with ast.literal_eval (about 0.4 ms),
# which dominated reading a shard; all full members of a dataset share one header.
_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], np.dtype]] = {}


def load_npy(data: bytes | memoryview) -> np.ndarray:
    """np.load for a C-order .npy held in memory, as a read-only view (np.frombuffer)."""
    if bytes(data[:6]) != b"\x93NUMPY" or data[6] not in (1, 2, 3):
        raise ValueError("not a .npy member")
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    header = bytes(data[start:end])
    meta = _NPY_HEADERS.get(header)
    if meta is None:
        fp = io.BytesIO(bytes(data[:end]))
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp)
        if fortran or dtype.hasobject:
            raise ValueError(f"unsupported .npy layout (fortran_order={fortran}, dtype={dtype})")
        meta = (shape, dtype)
        if len(_NPY_HEADERS) > 64:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[header] = meta
    shape, dtype = meta
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=end).reshape(shape)


def tar_samples(data: bytes) -> list[dict[str, memoryview]]:
    """The webdataset samples ({ext: payload}) of an in-memory tar, payloads as zero-copy views."""
    view = memoryview(data)
    samples: dict[str, dict[str, memoryview]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if info.isreg():
                key, ext = base_plus_ext(info.name)
                if info.offset_data + info.size > len(data):
                    raise ValueError(f"member {info.name} runs past the end of the file")
                samples.setdefault(key, {})[ext] = view[info.offset_data:info.offset_data + info.size]
    return list(samples.values())


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_shard(root: Path, rel: str, tokens: np.ndarray, index: np.ndarray, shard_id: int) -> dict:
    """Write rows `tokens` [n, L] with their source row ids `index` [n]; return the manifest entry."""
    buf = io.BytesIO()
    with TarWriter(buf, encoder=False, mtime=0, user="titanforge", group="titanforge") as writer:
        for chunk, start in enumerate(range(0, len(tokens), ROWS_PER_MEMBER)):
            stop = start + ROWS_PER_MEMBER
            writer.write({"__key__": f"{shard_id:06d}-{chunk:04d}",
                          "tokens.npy": _npy_bytes(np.ascontiguousarray(tokens[start:stop])),
                          "index.npy": _npy_bytes(np.ascontiguousarray(index[start:stop], dtype=np.int64))})
    data = buf.getvalue()
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return {"file": rel, "samples": int(len(tokens)), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_shard(root: Path, entry: dict, sample_len: int, dtype: str, verify: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, sample_len] and source ids [n] of one shard; CorruptShardError names what is wrong."""
    path = Path(root) / entry["file"]

    def corrupt(why: str) -> CorruptShardError:
        return CorruptShardError(f"corrupt shard {path}: {why}; {PREPARE_HINT.format(root=root)} "
                                 f"(or set data.on_corrupt=skip to train without it)")

    try:
        data = path.read_bytes()
    except OSError as e:
        raise corrupt(f"cannot read it ({e.strerror})") from None
    if len(data) != entry["bytes"]:
        raise corrupt(f"{len(data)} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise corrupt("sha256 differs from the manifest (bytes altered)")
    tokens, index = [], []
    try:
        for sample in tar_samples(data):
            tokens.append(load_npy(sample["tokens.npy"]))
            index.append(load_npy(sample["index.npy"]))
    except Exception as e:  # tarfile, webdataset and numpy raise many types for garbage input
        raise corrupt(f"not a readable token tar ({type(e).__name__}: {e})") from None
    if not tokens:
        raise corrupt("no token members")
    rows = tokens[0] if len(tokens) == 1 else np.concatenate(tokens)
    ids = index[0] if len(index) == 1 else np.concatenate(index)
    if rows.dtype != np.dtype(dtype) or rows.ndim != 2 or rows.shape[1] != sample_len:
        raise corrupt(f"rows are {rows.dtype}{list(rows.shape)}, expected {dtype}[n, {sample_len}]")
    if len(rows) != entry["samples"] or len(ids) != len(rows):
        raise corrupt(f"{len(rows)} rows / {len(ids)} ids, the manifest says {entry['samples']}")
    return rows, ids


def fingerprint(manifest: dict) -> str:
    """Identifies the token content of a dataset (shards and their hashes), not where it lies."""
    key = {"seq_len": manifest["seq_len"], "dtype": manifest["dtype"],
           "splits": {s: [(e["file"], e["samples"], e["sha256"]) for e in manifest["splits"][s]["shards"]]
                      for s in SPLITS}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def write_manifest(root: Path, manifest: dict) -> Path:
    path = Path(root) / "manifest.json"
    tmp = path.with_name("manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """Load and check `<path>/manifest.json` (or the file itself); adds "root", the data directory.

    Raises DataError naming the file when it is missing or garbled or a listed shard is missing.
    """
    path = Path(path).expanduser()
    file = path if path.suffix == ".json" else path / "manifest.json"
    root = file.parent
    hint = PREPARE_HINT.format(root=root)
    if not file.is_file():
        raise DataError(f"{file} does not exist: no prepared data there; {hint} (or set data.path to the "
                        f"directory that `prepare` wrote)")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{file} is not valid JSON ({e}); {hint}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{file} is not a {FORMAT} manifest (format={got!r}); {hint}")
    required = ("seq_len", "sample_len", "dtype", "vocab_size", "eos_id", "tokenizer", "source", "splits")
    missing = [k for k in required if k not in manifest]
    missing += [f"splits.{s}" for s in SPLITS if s not in manifest.get("splits", {})]
    if missing:
        raise DataError(f"{file} lacks {', '.join(missing)}; {hint}")
    try:
        entries = [e for s in SPLITS for e in manifest["splits"][s]["shards"]]
        files = [(root / e["file"], e["samples"], e["bytes"], e["sha256"])[0] for e in entries]
    except (KeyError, TypeError) as e:
        raise DataError(f"{file} has a malformed shard list ({type(e).__name__}: {e}); {hint}") from None
    for shard in files:
        if not shard.is_file():
            raise DataError(f"shard {shard} listed in {file} is missing; {hint}")
    manifest["root"] = str(root)
    return manifest
