"""Read the history rows of an offline W&B run file (`run-<id>.wandb`) back.

The tracker reads the offline runs of a resumed W&B id to find the steps they already hold (so a
resume logs each step exactly once); the tests read rows and config with it.

wandb 0.31 ships no reader. The file is a 7-byte header (":W&B", magic 0xBEE1, version 0)
followed by LevelDB-log framing: 32 KiB blocks of records [crc32c:4][length:2 LE][type:1][data],
type FULL=1 or FIRST=2 / MIDDLE=3 / LAST=4 for a payload split across blocks; each payload is a
serialised `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_HEADER = 7
_BLOCK = 32768


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        return
    pos, parts = _HEADER, []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break  # the tail a killed writer left half-written
        body = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield body
        elif kind == 2:
            parts = [body]
        elif kind == 3:
            parts.append(body)
        elif kind == 4:
            parts.append(body)
            yield b"".join(parts)


def history(run_file: str | Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in _payloads(Path(run_file).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def config(run_file: str | Path) -> dict:
    """The run config as sent with `wandb.init(config=...)` (carried in the `run` record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = {}
    for payload in _payloads(Path(run_file).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "run":
            for item in rec.run.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def logged_steps(run_file: str | Path) -> list[int]:
    """The `_step` of every history row (a step twice if it was logged twice)."""
    steps = []
    for row in history(run_file):
        if "_step" in row:
            steps.append(int(row["_step"]))
    return steps
