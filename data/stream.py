"""The batch stream of one rank, as an IterableDataset that any number of DataLoader workers share.

Batch k of the stream holds the next micro_batch_size valid samples of the rank order (order.py)
after those of batch k-1, starting at position `start`. Worker w of W builds only the batches
k = w (mod W), and torch's DataLoader hands batches out round-robin over workers in order
(in_order=True), so the consumer sees batch 0, 1, 2, ... whatever W is; resuming is starting at
the saved position.

Every worker opens every shard of the rank order, including those whose rows all go to other
workers: a corrupt shard is then seen by all workers alike, so they agree on which samples are
skipped and on where each batch starts. Opening is cheap (one file read and np.frombuffer, see
shards.py), and data that fits data.cache_mb is opened once per process. A skipped shard is
reported once, by the worker that builds the batch in progress when it was met; each batch
carries the position after its last sample, which becomes the loader's checkpoint position once
the consumer has taken the batch.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from titanforge.data.order import RankOrder
from titanforge.data.shards import CorruptShardError, DataError, read_shard


def keep_numpy(batch: tuple) -> tuple:
    """DataLoader collate_fn that leaves the batch as numpy (see TokenStream._collate)."""
    return batch


def _nbytes(loaded) -> int:
    return 0 if isinstance(loaded, Exception) else loaded[0].nbytes + loaded[1].nbytes


class TokenStream(IterableDataset):
    def __init__(self, root: str | Path, shards: list[dict], sample_len: int, dtype: str, order: RankOrder,
                 batch_size: int, start: int = 0, on_corrupt: str = "skip", verify: bool = True,
                 max_batches: int | None = None, cache_bytes: int = 0):
        self.root, self.shards, self.sample_len, self.dtype = Path(root), shards, sample_len, dtype
        self.order, self.batch_size, self.start = order, batch_size, start
        self.on_corrupt, self.verify, self.max_batches = on_corrupt, verify, max_batches
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, object] = OrderedDict()
        self._cached_bytes = 0
        # Shards whose sha256 this process has checked: a later read (one that fell out of the
        # cache) checks only the size; hashing halves the loader's speed (bench/data_loader.py).
        self._verified: set[int] = set()

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self._batches(worker, workers)

    def _load(self, shard: int):
        """(rows, ids) of a shard, or the CorruptShardError it raised.

        Keeps the two latest shards, and older ones while they fit in cache_bytes (least recently
        used go first): a dataset that fits is read from disk once per process.
        """
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        try:
            verify = self.verify and shard not in self._verified
            loaded = read_shard(self.root, self.shards[shard], self.sample_len, self.dtype, verify)
            self._verified.add(shard)
        except CorruptShardError as e:
            loaded = e
        self._cache[shard] = loaded
        self._cached_bytes += _nbytes(loaded)
        while len(self._cache) > 2 and self._cached_bytes > self.cache_bytes:
            self._cached_bytes -= _nbytes(self._cache.popitem(last=False)[1])
        return loaded

    def _collate(self, parts: list, next_position: int, events: list | None) -> tuple:
        """(tokens int64 [B, L], index int64 [B], position after the batch, skipped-shard events or None).

        numpy, not tensors: a tensor leaving a worker goes through a shared-memory file (about
        10 ms per batch here), a pickled array through the pipe; the loader makes the tensors.
        """
        if len(parts) == 1:
            rows, ids, sel = parts[0]
            return rows[sel].astype(np.int64), ids[sel], next_position, events
        tokens = np.concatenate([rows[sel] for rows, _, sel in parts]).astype(np.int64)
        return tokens, np.concatenate([ids[sel] for _, ids, sel in parts]), next_position, events

    def _batches(self, worker: int, workers: int):
        B, M = self.batch_size, self.order.per_rank
        epoch, offset = divmod(self.start, M)
        position = self.start
        k, filled, parts = 0, 0, []
        events: dict[int, list] = {}
        # Positions passed since the last valid sample, to stop instead of spinning when none is readable.
        barren = 0
        corrupt: set[int] = set()
        while True:
            for shard, a, b in self.order.segments(epoch, offset):
                loaded = self._load(shard)
                if isinstance(loaded, CorruptShardError):
                    if self.on_corrupt == "fail":
                        raise loaded
                    events.setdefault(k, []).append({"shard": self.shards[shard]["file"], "samples": b - a,
                                                     "reason": str(loaded)})
                    position += b - a
                    barren += b - a
                    corrupt.add(shard)
                    # Unshuffled, the next epoch reads the same block again; shuffled, it only
                    # would if every shard were corrupt.
                    if barren >= M and (not self.order.shuffle or len(corrupt) == len(self.shards)):
                        raise DataError(f"every shard rank {self.order.dp_rank} reads from {self.root} is corrupt "
                                        f"(last: {loaded}); re-run `titanforge prepare --out {self.root}`")
                    continue
                rows, ids = loaded
                sel = self.order.row_order(epoch, shard)[a:b]
                barren = 0
                pos = 0
                while pos < len(sel):
                    take = min(B - filled, len(sel) - pos)
                    if k % workers == worker:
                        parts.append((rows, ids, sel[pos:pos + take]))
                    pos, filled, position = pos + take, filled + take, position + take
                    if filled == B:
                        batch_events = events.pop(k, None)
                        if k % workers == worker:
                            yield self._collate(parts, position, batch_events)
                        k, filled, parts = k + 1, 0, []
                        if self.max_batches is not None and k >= self.max_batches:
                            return
            epoch, offset = epoch + 1, 0
