"""The global sample order: which shard row each position of the data stream reads.

Epoch e is one pass over all N samples: shards in a permutation drawn from (seed, e), the rows of
each shard in a permutation drawn from (seed, e, shard). The stream is epoch 0, epoch 1, ...,
and a position p = e * N + offset names one sample of it. The order depends on neither the
number of data-parallel ranks nor DataLoader workers: stream.py deals its micro-batches out to
ranks and workers, so a run on any dp_size sees the same global batches, and a checkpointed
position means the same thing whatever the job is resumed with.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# First word of every seed sequence drawn by the loader (prepare uses another tag). Seed sequences
# have a fixed length of four words, so no two draws can collide by padding.
LOADER_TAG = 0x6c64


class GlobalOrder:
    def __init__(self, shard_sizes: Sequence[int], seed: int, shuffle: bool):
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.seed, self.shuffle = seed, shuffle
        # Samples per epoch.
        self.total = int(self.sizes.sum())

    def shard_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.sizes))
        return np.random.default_rng([LOADER_TAG, self.seed, epoch, 0]).permutation(len(self.sizes))

    def row_order(self, epoch: int, shard: int) -> np.ndarray:
        n = int(self.sizes[shard])
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([LOADER_TAG, self.seed, epoch, shard + 1]).permutation(n)

    def segments(self, epoch: int, offset: int = 0) -> list[tuple[int, int, int]]:
        """[(shard, a, b)]: rows row_order(epoch, shard)[a:b], in stream order, for the positions
        offset .. total - 1 of `epoch`."""
        order = self.shard_order(epoch)
        sizes = self.sizes[order]
        starts = np.cumsum(sizes) - sizes
        out = []
        for shard, start, size in zip(order.tolist(), starts.tolist(), sizes.tolist()):
            if start + size > offset:
                out.append((shard, max(offset - start, 0), size))
        return out
