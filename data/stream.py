"""The batch stream of one data-parallel rank, as an IterableDataset its DataLoader workers share.

The global stream (order.py) is cut into micro-batches g = 0, 1, 2, ... of micro_batch_size
samples from position `start` on. Rank r of dp_size takes g = r (mod dp_size), so the dp_size
micro-batches of one group are what a single process would take as dp_size accumulation steps:
a run gives the same global batches on any number of ranks. Worker w of W takes the rank's
j-th micro-batch when j = w (mod W), and torch's DataLoader hands batches out round-robin over
workers in order (in_order=True), so the consumer sees the rank's batches in order whatever W is.

Every rank and worker walks the whole global stream and opens every shard (taking rows only for
its own batches): a corrupt shard is then seen by all alike, so they agree on which samples are
skipped and where each batch starts. Opening is cheap (one file read and np.frombuffer, see
shards.py), and data that fits data.cache_mb is opened once per process; the price is that each
rank reads all shards, using 1/dp_size of each. A skipped shard is reported once per rank, with
that rank's next batch. Each batch carries the position where the next group of dp_size batches
starts: once the consumer has taken it, that is the checkpoint position, the same on every rank.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from titanforge.data.order import GlobalOrder
from titanforge.data.shards import CorruptShardError, DataError, read_shard


def keep_numpy(batch: tuple) -> tuple:
    """DataLoader collate_fn that leaves the batch as numpy (see TokenStream._collate)."""
    return batch


def _nbytes(loaded) -> int:
    return 0 if isinstance(loaded, Exception) else loaded[0].nbytes + loaded[1].nbytes


class TokenStream(IterableDataset):
    def __init__(self, root: str | Path, shards: list[dict], sample_len: int, dtype: str, order: GlobalOrder,
                 batch_size: int, dp_rank: int = 0, dp_size: int = 1, start: int = 0, on_corrupt: str = "skip",
                 verify: bool = True, max_batches: int | None = None, cache_bytes: int = 0):
        self.root, self.shards, self.sample_len, self.dtype = Path(root), shards, sample_len, dtype
        self.order, self.batch_size, self.dp_rank, self.dp_size = order, batch_size, dp_rank, dp_size
        self.start, self.on_corrupt, self.verify, self.max_batches = start, on_corrupt, verify, max_batches
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

    def _collate(self, parts: list, events: list | None, next_position: int) -> tuple:
        """(tokens int64 [B, L], index int64 [B], events or None, position after the batch's group).

        numpy, not tensors: a tensor leaving a worker goes through a shared-memory file (about
        10 ms per batch here), a pickled array through the pipe; the loader makes the tensors.
        """
        if len(parts) == 1:
            rows, ids, sel = parts[0]
            return rows[sel].astype(np.int64), ids[sel], events, next_position
        tokens = np.concatenate([rows[sel] for rows, _, sel in parts]).astype(np.int64)
        return tokens, np.concatenate([ids[sel] for _, ids, sel in parts]), events, next_position

    def _batches(self, worker: int, workers: int):
        B, N, r, dp = self.batch_size, self.order.total, self.dp_rank, self.dp_size
        epoch, offset = divmod(self.start, N)
        position = self.start
        # g: global micro-batch being filled; parts: its rows if it is ours.
        g, filled, parts = 0, 0, []
        # Our finished batch, held until its group of dp micro-batches ends (that is its position).
        pending = None
        # Skipped-shard reports by the global micro-batch of this rank that carries them.
        events: dict[int, list] = {}
        # Positions passed since the last valid sample, to stop instead of spinning when none is readable.
        barren = 0
        while True:
            for shard, a, b in self.order.segments(epoch, offset):
                loaded = self._load(shard)
                if isinstance(loaded, CorruptShardError):
                    if self.on_corrupt == "fail":
                        raise loaded
                    events.setdefault(g + (r - g) % dp, []).append(
                        {"shard": self.shards[shard]["file"], "samples": b - a, "reason": str(loaded)})
                    position += b - a
                    barren += b - a
                    # A whole epoch without a valid sample: every shard is corrupt.
                    if barren >= N:
                        raise DataError(f"every shard of this split in {self.root} is corrupt (last: {loaded}); "
                                        f"re-run `titanforge prepare --out {self.root}`")
                    continue
                rows, ids = loaded
                sel = self.order.row_order(epoch, shard)[a:b]
                barren = 0
                pos = 0
                while pos < len(sel):
                    take = min(B - filled, len(sel) - pos)
                    mine = g % dp == r and (g // dp) % workers == worker
                    if mine:
                        parts.append((rows, ids, sel[pos:pos + take]))
                    pos, filled, position = pos + take, filled + take, position + take
                    if filled < B:
                        continue
                    if g % dp == r:
                        batch_events = events.pop(g, None)
                        if mine:
                            pending = (parts, batch_events)
                    if g % dp == dp - 1 and pending is not None:
                        yield self._collate(*pending, position)
                        pending = None
                    g, filled, parts = g + 1, 0, []
                    if self.max_batches is not None and g >= self.max_batches * dp:
                        return
            epoch, offset = epoch + 1, 0
