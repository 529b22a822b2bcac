"""A count-min sketch: approximate counts of many keys in a fixed amount of memory.

The dynamic embedding table's frequency filter (``aitm.embedding_table``) counts the sightings of
values that have no row yet here, so that counting a long tail of IDs seen once costs a fixed
``depth x width`` array rather than a dict that grows with every ID the stream ever brings.
Estimates never undercount (below the counters' cap of 255); with ``total`` increments spread over ``width`` counters a key is
over-counted by more than ``e * total / width`` with probability at most ``exp(-depth)``.
Counts age: once ``width`` increments have been added since the last halving, every counter is
halved, so a key must be seen ``min_count`` times within roughly the last ``width`` sightings of
new values, and old sightings stop saturating the counters.

>>> s = CountMinSketch(width=1024, depth=3)
>>> s.add(["a", "b", "a"]).tolist()  # running estimates after the batch
[2, 1, 2]
>>> s.add(["a"]).tolist()
[3]
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def key_hashes(keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 32-bit hashes per key (blake2b, the same in every process and run)."""
    raw = b"".join(hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys)
    h = np.frombuffer(raw, dtype=np.uint32).reshape(-1, 2).astype(np.int64)  # (K, 2)
    return h[:, 0], h[:, 1] | 1  # an odd step: double hashing visits distinct counters


CAP = 255  # counters saturate here: a frequency filter only needs to count up to its threshold


class CountMinSketch:
    """``depth`` rows of ``width`` uint8 counters (saturating at ``CAP``); row ``i`` indexes
    ``h1 + i * h2 mod width``. One byte a counter keeps it small inside every checkpoint."""

    def __init__(self, width: int = 1 << 20, depth: int = 3) -> None:
        if width < 16 or depth < 1:
            raise ValueError(f"a sketch needs width >= 16 and depth >= 1, got {width} x {depth}")
        self.width = int(width)
        self.depth = int(depth)
        self.table = np.zeros((self.depth, self.width), np.uint8)  # (D, W)
        self.added_since_halving = 0

    @property
    def nbytes(self) -> int:
        return int(self.table.nbytes)

    def _cells(self, keys: Sequence[str]) -> np.ndarray:
        h1, h2 = key_hashes(keys)
        steps = np.arange(self.depth, dtype=np.int64)[:, None]  # (D, 1)
        return (h1[None, :] + steps * h2[None, :]) % self.width  # (D, K)

    def add(self, keys: Sequence[str], counts: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Add ``counts`` (default 1 each) sightings of ``keys``; return their estimates after.

        A key listed twice is counted twice; its estimates are equal.
        """
        if not keys:
            return np.zeros(0, np.int64)
        c = np.ones(len(keys), np.int64) if counts is None else np.asarray(counts, np.int64)
        cells = self._cells(keys)  # (D, K)
        for i in range(self.depth):
            uniq, inverse = np.unique(cells[i], return_inverse=True)
            added = np.bincount(inverse.reshape(-1), weights=c, minlength=uniq.size).astype(np.int64)  # (U,)
            row = self.table[i]
            row[uniq] = np.minimum(CAP, row[uniq].astype(np.int64) + added).astype(np.uint8)
        est = self.table[np.arange(self.depth)[:, None], cells].min(axis=0).astype(np.int64)  # (K,)
        self.added_since_halving += int(c.sum())
        if self.added_since_halving >= self.width:
            self.table >>= 1
            self.added_since_halving = 0
        return est

    def estimate(self, keys: Sequence[str]) -> np.ndarray:
        if not keys:
            return np.zeros(0, np.int64)
        cells = self._cells(keys)
        return self.table[np.arange(self.depth)[:, None], cells].min(axis=0).astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"width": self.width, "depth": self.depth, "added_since_halving": self.added_since_halving,
                "table": torch.from_numpy(self.table.copy())}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> CountMinSketch:
        s = cls(int(state["width"]), int(state["depth"]))
        s.table = np.asarray(state["table"].numpy(), np.uint8).reshape(s.depth, s.width).copy()
        s.added_since_halving = int(state["added_since_halving"])
        return s
