"""The sample order of one data-parallel rank: which shard row each position of its stream reads.

Epoch e has one global order, the same on every rank: shards in a permutation drawn from
(seed, e), the rows of each shard in a permutation drawn from (seed, e, shard). Rank r of
dp_size reads the contiguous block [r*M, (r+1)*M) of that order, M = N // dp_size, so every rank
yields the same number of samples per epoch, each sample is read by exactly one rank, the
N mod dp_size samples at the end of the order are left out of that epoch (different ones each
epoch when shuffling), and a rank only opens the shards its block touches (plus at most two it
shares with its neighbours). The stream of a rank is epoch 0, epoch 1, ...; its position
p = epoch * M + offset is all a checkpoint needs. Nothing here depends on DataLoader workers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# First word of every seed sequence drawn by the loader (prepare uses another tag). Seed sequences
# have a fixed length of four words, so no two draws can collide by padding.
LOADER_TAG = 0x6c64


class RankOrder:
    def __init__(self, shard_sizes: Sequence[int], dp_rank: int, dp_size: int, seed: int, shuffle: bool):
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.total = int(self.sizes.sum())
        # Samples this rank reads per epoch.
        self.per_rank = self.total // dp_size

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
        """[(shard, a, b)]: rows row_order(epoch, shard)[a:b], in stream order, for this rank's
        positions offset .. per_rank - 1 of `epoch`."""
        order = self.shard_order(epoch)
        sizes = self.sizes[order]
        ends = np.cumsum(sizes)
        starts = ends - sizes
        lo = self.dp_rank * self.per_rank + offset
        hi = (self.dp_rank + 1) * self.per_rank
        out = []
        k = int(np.searchsorted(ends, lo, side="right"))
        while k < len(order) and starts[k] < hi:
            a, b = max(lo - int(starts[k]), 0), min(hi - int(starts[k]), int(sizes[k]))
            if a < b:
                out.append((int(order[k]), a, b))
            k += 1
        return out
