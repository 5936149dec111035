"""Config of the data pipeline: where the prepared shards are and how they are streamed."""

from __future__ import annotations

from dataclasses import dataclass, field

from titanforge.data.tasks.config import TaskMixConfig


@dataclass
class DataConfig:
    # Directory holding manifest.json and the train/ and val/ webdataset shards
    # (written by `titanforge prepare`). Mandatory ("???" is OmegaConf's marker for a value that
    # must be given): presets set it, e.g. runs/data/shakespeare-gpt2.
    path: str = "???"
    # DataLoader worker processes per rank (the stream position does not depend on it).
    num_workers: int = 0
    # What to do with a truncated or garbage shard: skip (warn and count) | fail (raise naming it).
    on_corrupt: str = "skip"
    # Shuffle the shard order and samples each epoch (deterministic in the seed and epoch).
    shuffle: bool = True
    # Check each shard's sha256 against the manifest the first time a process reads it (catches
    # altered bytes that keep the tar readable; costs about 1 ms per MB). Sizes are always checked.
    verify_checksums: bool = True
    # Decoded shards each loader process (rank or DataLoader worker) keeps across epochs, in MB:
    # data that fits is read from disk once. 0 keeps only the two latest shards.
    cache_mb: int = 256
    # Pin batches in page-locked memory for faster host-to-GPU copies (ignored without CUDA).
    pin_memory: bool = False
    # Synthetic long-context tasks mixed into the training rows (data/tasks/; empty names: corpus only).
    tasks: TaskMixConfig = field(default_factory=TaskMixConfig)
