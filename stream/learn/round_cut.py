"""Several trainer ranks cut their rounds on the order of *all* partitions: each round trains the
batch one trainer would.

Each rank's feed hands over its own share of the ``samples`` partitions merged by stream time
(``stream.learn.partition_merge``); every sample carries its place in that order, the key
(stream time, partition, offset). What a rank has received is a prefix of its share's merged
order, and the order of all partitions is the merge of the shares' orders. So when every rank
shows the keys of its next ``size`` samples (one all-gather), every rank can compute the same
cut: the next ``size`` samples of the global order, and how many of them are each rank's. With
the loss's per-task means taken over every rank's rows (``stream.learn.learner``) and the table
fed in that global order (``RankSync.encode``), the round is one trainer's step on the same
batch, up to the order of float sums.

The cut is sure only where no rank could still bring an earlier sample: a rank whose partitions
hold records it has not received (``behind``) and whose every shown sample falls inside the cut
may have more to add before the cut's end, so the round waits for it (as a single trainer's feed
waits for a partition behind). A rank that is caught up holds nothing back: with the stream
caught up everywhere, the ranks step on what they hold once the oldest sample has waited the
linger time, as one trainer's partial batch does.

>>> heads = [np.array([[1, 0, 0], [3, 0, 1]]), np.array([[2, 1, 0], [4, 1, 1]])]
>>> plan_round(heads, behind=[False, False], size=3, lingered=False)
[2, 1]
>>> plan_round(heads, behind=[True, False], size=3, lingered=False) is None  # rank 0 may bring more before 3
True
>>> plan_round([heads[0][:1], heads[1]], behind=[False, False], size=3, lingered=False)  # 3 samples
[1, 2]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stream.learn.batcher import Batch
from stream.learn.feed import Chunk
from stream.learn.sample_batch import SampleBatch

NO_KEYS = np.zeros((0, 3), np.int64)


def plan_round(heads: Sequence[np.ndarray], behind: Sequence[bool], size: int, lingered: bool,
               flush: bool = False) -> list[int] | None:
    """How many of its held samples each rank trains this round, or None: no round yet.

    ``heads[r]``: the keys (K, 3) of rank r's next at most ``size`` samples, in order;
    ``behind[r]``: rank r's partitions hold records it has not received; ``lingered``: some rank's
    oldest held sample has waited the linger time; ``flush``: train what is held (a stop, or a
    rank behind that sent nothing for too long)."""
    total = sum(len(h) for h in heads)
    if total == 0:
        return None
    if total < size and not flush and (any(behind) or not lingered):
        return None  # a backlog still coming in, or a caught-up stream not yet lingered
    keys = np.concatenate([h for h in heads if len(h)])  # (sum K, 3)
    owner = np.repeat(np.arange(len(heads)), [len(h) for h in heads])
    order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))[:size]  # the global merged order
    counts = np.bincount(owner[order], minlength=len(heads)).tolist()
    if not flush:
        for r, h in enumerate(heads):
            # every sample rank r shows is in the cut, and it has more on the broker: one of those
            # could still come before the cut's end
            if behind[r] and counts[r] == len(h) < size:
                return None
    return [int(c) for c in counts]


@dataclass
class RoundPool:
    """One rank's received samples not yet trained, in its share's merged order, with their keys,
    when each was consumed, and the offsets that are safe to resume from once a prefix is trained."""

    parts: list[SampleBatch] = field(default_factory=list)
    keys: np.ndarray = field(default_factory=lambda: NO_KEYS.copy())  # (n, 3)
    at_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (n,) consumed at (trainer clock)
    mono: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,) consumed at (monotonic s)
    received: dict[int, int] = field(default_factory=dict)  # partition -> offset after the last record received

    @property
    def n(self) -> int:
        return len(self.keys)

    def add(self, chunk: Chunk, now_ms: int, mono: float) -> None:
        k = len(chunk.samples)
        if k:
            if len(chunk.keys) != k:
                raise ValueError(f"a chunk of {k} samples carries {len(chunk.keys)} keys (the feed's merge gives them)")
            self.parts.append(chunk.samples)
            self.keys = np.concatenate([self.keys, chunk.keys])
            self.at_ms = np.concatenate([self.at_ms, np.full(k, now_ms, np.int64)])
            self.mono = np.concatenate([self.mono, np.full(k, mono)])
        self.received.update(chunk.offsets)

    def head(self, size: int) -> np.ndarray:
        """The keys of the next ``size`` samples (fewer when fewer are held)."""
        return self.keys[:size]

    def waited_s(self, mono: float) -> float:
        """How long the oldest held sample has waited (0 with none)."""
        return mono - float(self.mono[0]) if self.n else 0.0

    def take(self, k: int, now_ms: int) -> Batch:
        """The next ``k`` samples as a batch, with the offsets safe to resume from once it is
        trained: per partition, the first sample still held, or past every record received."""
        if k > self.n:
            raise ValueError(f"{k} samples asked, {self.n} held")
        first_at = int(self.at_ms[0]) if k else now_ms
        out: list[SampleBatch] = []
        need = k
        while need:  # whole parts, and the one the cut falls in split (no copy of the rest)
            part = self.parts[0]
            if len(part) <= need:
                out.append(self.parts.pop(0))
                need -= len(part)
            else:
                out.append(part.take(np.arange(need)))
                self.parts[0] = part.take(np.arange(need, len(part)))
                need = 0
        keys = self.keys[:k]
        self.keys, self.at_ms, self.mono = self.keys[k:], self.at_ms[k:], self.mono[k:]
        offsets = dict(self.received)
        for p in np.unique(self.keys[:, 1]).tolist():
            offsets[p] = int(self.keys[self.keys[:, 1] == p, 2].min())
        return Batch(out, first_at, now_ms, offsets, keys)


__all__ = ["NO_KEYS", "RoundPool", "plan_round"]
