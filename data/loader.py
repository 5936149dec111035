"""Train and validation loaders over prepared shards: what the trainer iterates and checkpoints.

    loader = build_train_loader(cfg, micro_batch_size=4, dp_rank=r, dp_size=n, seed=0)
    batch = next(loader)        # {"tokens": int64 [4, seq_len + 1], "index": int64 [4] source row ids}
    state = loader.state_dict() # where the next unseen samples start
    val = build_val_loader(cfg, micro_batch_size=4, dp_rank=r, dp_size=n)  # len(val) batches, same each pass

The train loader is an endless stream over epochs, the val loader one unshuffled pass of len(val)
batches, equal on every rank. Both deal the micro-batches of one global order out to the ranks
(order.py, stream.py), so the global batches, and a checkpointed position, do not depend on
dp_size, num_workers or micro_batch_size. webdataset supplies the shard format and writer; it
has no resumable position and splits by the RANK/WORLD_SIZE environment rather than the
data-parallel rank, so the order is ours: splits follow the dp_rank/dp_size passed in, and the
seed must be the same on every rank. The validation loader reads in the calling process
(num_workers 0): an evaluation takes a few batches, and forking workers for each would cost more.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.utils.data import DataLoader

from titanforge.data.config import DataConfig
from titanforge.data.order import GlobalOrder
from titanforge.data.shards import DataError, read_manifest
from titanforge.data.stream import TokenStream, keep_numpy

logger = logging.getLogger("titanforge.data")
STATE_VERSION = 1


def _check(cfg: DataConfig, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int) -> None:
    if cfg.on_corrupt not in ("skip", "fail"):
        raise ValueError(f"data.on_corrupt={cfg.on_corrupt!r} must be skip | fail")
    if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
        raise ValueError(f"data.num_workers={cfg.num_workers!r} must be an integer >= 0")
    if not isinstance(cfg.cache_mb, int) or cfg.cache_mb < 0:
        raise ValueError(f"data.cache_mb={cfg.cache_mb!r} must be an integer >= 0 (0 keeps only two shards)")
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size!r} must be a positive integer")
    if not isinstance(dp_size, int) or dp_size < 1 or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank!r} / dp_size={dp_size!r}: need 0 <= dp_rank < dp_size "
                         f"(the data-parallel rank and degree, not the global ones)")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer, the same on every rank")


class _Loader:
    def __init__(self, cfg: DataConfig, manifest: dict, split: str, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, shuffle: bool, num_workers: int):
        self.cfg, self.manifest, self.split = cfg, manifest, split
        self.micro_batch_size, self.num_workers = micro_batch_size, num_workers
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shards = manifest["splits"][split]["shards"]
        self.order = GlobalOrder([s["samples"] for s in self.shards], seed, shuffle)
        self.stats = {"batches": 0, "samples": 0, "corrupt_shards": 0, "skipped_samples": 0}
        self._pin = cfg.pin_memory and torch.cuda.is_available()

    @property
    def samples_per_epoch(self) -> int:
        """Samples in one epoch over all ranks (rank r takes every dp_size-th micro-batch)."""
        return self.order.total

    def _open(self, start: int, max_batches: int | None = None):
        stream = TokenStream(self.manifest["root"], self.shards, self.manifest["sample_len"], self.manifest["dtype"],
                             self.order, self.micro_batch_size, self.dp_rank, self.dp_size, start,
                             self.cfg.on_corrupt, self.cfg.verify_checksums, max_batches, self.cfg.cache_mb << 20)
        if self.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=keep_numpy,
                               in_order=True))

    def _finish(self, raw: tuple) -> tuple[dict, int]:
        """The batch dict from a stream item; counts it and reports skipped shards."""
        tokens, index, events, next_position = raw
        for event in events or ():
            self.stats["corrupt_shards"] += 1
            self.stats["skipped_samples"] += event["samples"]
            logger.warning("skipped %s of the %s split (%d samples): %s", event["shard"], self.split,
                           event["samples"], event["reason"])
        self.stats["batches"] += 1
        self.stats["samples"] += self.micro_batch_size
        tokens, index = torch.from_numpy(tokens), torch.from_numpy(index)
        if self._pin:
            tokens, index = tokens.pin_memory(), index.pin_memory()
        return {"tokens": tokens, "index": index}, int(next_position)


class TrainLoader(_Loader):
    """Endless, resumable batch stream of one data-parallel rank (an iterator)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Global stream position where the next group of dp_size micro-batches starts: every
        # sample before it has been seen by some rank. The same on every rank.
        self.position = 0
        self._it = None

    @property
    def epoch(self) -> int:
        return self.position // self.order.total

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._open(self.position)
        try:
            raw = next(self._it)
        except BaseException:
            self.close()
            raise
        batch, self.position = self._finish(raw)
        return batch

    def close(self) -> None:
        """Stop the worker processes (a later next() starts new ones at the same position)."""
        # Shut workers down now: a worker's exception leaves the DataLoader iterator in a reference
        # cycle, and when the garbage collector finalizes it the workers miss the stop signal and
        # are killed only after a 5 s join timeout each. torch has no public close for it.
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._it = None

    def state_dict(self) -> dict:
        o = self.order
        return {"version": STATE_VERSION, "position": self.position, "epoch": self.epoch,
                "samples_per_epoch": o.total, "dp_size": self.dp_size, "micro_batch_size": self.micro_batch_size,
                "seed": o.seed, "shuffle": o.shuffle, "fingerprint": self.manifest["fingerprint"],
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position: the next batches hold the first samples no rank has seen.

        The position is global and the same on every rank, so this is exact for any dp_size,
        num_workers and micro_batch_size. With another seed or shuffle the order itself differs:
        the stream resumes at the same epoch and offset, with a warning.
        """
        missing = [k for k in ("version", "position", "seed", "shuffle", "fingerprint") if k not in state]
        if missing:
            raise ValueError(f"data loader state lacks {missing}; it was not written by TrainLoader.state_dict()")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"data loader state version {state['version']} is not {STATE_VERSION}")
        if state["fingerprint"] != self.manifest["fingerprint"]:
            raise ValueError(f"the checkpoint's data position belongs to other data (fingerprint "
                             f"{state['fingerprint'][:12]}) than data.path={self.manifest['root']} "
                             f"({self.manifest['fingerprint'][:12]}); point data.path at the data the run started "
                             f"with, or start a new run (checkpoint.resume=never)")
        o = self.order
        if (state["seed"], state["shuffle"]) != (o.seed, o.shuffle):
            logger.warning("data position saved with seed=%s shuffle=%s, now seed=%s shuffle=%s: resuming at the "
                           "same epoch and offset of a different order (not sample-exact)", state["seed"],
                           state["shuffle"], o.seed, o.shuffle)
        self.position = int(state["position"])
        self.stats.update(state.get("stats", {}))
        self.close()


class ValLoader(_Loader):
    """len(self) batches of this rank's share of the val split, in the same order on every pass."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_batches = self.order.total // (self.micro_batch_size * self.dp_size)
        if self.num_batches < 1:
            raise DataError(f"the val split of {self.manifest['root']} has {self.order.total} samples, fewer than "
                            f"micro_batch_size * dp_size = {self.micro_batch_size} * {self.dp_size}; re-run "
                            f"prepare with a larger --val-fraction or lower train.micro_batch_size")

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        # Unshuffled, a pass past the end wraps to the start: shards skipped as corrupt are made up
        # for by repeats, so every rank still yields len(self) batches.
        for batch in self._open(0, max_batches=self.num_batches):
            yield self._finish(batch)[0]


def build_train_loader(cfg: DataConfig, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                       seed: int) -> TrainLoader:
    _check(cfg, micro_batch_size, dp_rank, dp_size, seed)
    manifest = read_manifest(cfg.path)
    if manifest["splits"]["train"]["samples"] == 0:
        raise DataError(f"{os.path.join(manifest['root'], 'manifest.json')} has no training samples; "
                        f"re-run `titanforge prepare` with more text or a smaller --seq-len")
    return TrainLoader(cfg, manifest, "train", micro_batch_size, dp_rank, dp_size, seed, cfg.shuffle, cfg.num_workers)


def build_val_loader(cfg: DataConfig, *, micro_batch_size: int, dp_rank: int, dp_size: int) -> ValLoader:
    _check(cfg, micro_batch_size, dp_rank, dp_size, 0)
    manifest = read_manifest(cfg.path)
    if manifest["splits"]["val"]["samples"] == 0:
        raise DataError(f"{os.path.join(manifest['root'], 'manifest.json')} has no val split (prepared with "
                        f"--val-fraction 0); re-run `titanforge prepare` with --val-fraction > 0 "
                        f"or set train.val_every=0")
    return ValLoader(cfg, manifest, "val", micro_batch_size, dp_rank, dp_size, 0, False, 0)
