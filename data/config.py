"""Config of the data pipeline: where the prepared shards are and how they are streamed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    # Directory holding manifest.json and the train/ and val/ webdataset shards
    # (written by `titanforge prepare`). Mandatory: presets set it, e.g. runs/data/shakespeare-gpt2.
    # "???" is OmegaConf's marker for a value that must be given.
    path: str = "???"
    # DataLoader worker processes per rank (the stream position does not depend on it).
    num_workers: int = 0
    # What to do with a truncated or garbage shard: skip (warn and count) | fail (raise naming it).
    on_corrupt: str = "skip"
    # Shuffle the shard order and samples each epoch (deterministic in the seed and epoch).
    shuffle: bool = True
