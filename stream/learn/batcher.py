"""The trainer's batching: the feed's chunks gathered into batches of ``TRAINER_BATCH_SIZE``
samples, a partial batch trained once it has waited ``TRAINER_LINGER_MS``, and the offsets a
restart may resume from (those of chunks wholly trained on or dead-lettered)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream.learn.feed import Chunk
from stream.learn.sample_batch import SampleBatch


@dataclass
class Batch:
    """A batch to train: its chunks' samples, when its first and last samples were consumed (ms,
    the trainer's clock), and the offsets that are safe once it is trained."""

    parts: list[SampleBatch]
    first_at_ms: int
    last_at_ms: int
    offsets: dict[int, int]
    keys: np.ndarray | None = None  # (N, 3) the samples' place in the merged order (several ranks)


@dataclass
class Batcher:
    size: int
    linger_ms: float
    parts: list[SampleBatch] = field(default_factory=list)  # the batch being gathered
    n: int = 0  # its samples
    offsets: dict[int, int] = field(default_factory=dict)  # chunks added since the last batch out
    first_at_ms: int | None = None
    first_mono = 0.0  # monotonic time of its first samples
    last_chunk_mono = 0.0  # of the last chunk with samples
    lingered_s = 0.0  # time partial batches waited for samples that did not come

    def overflow(self, chunk: Chunk, now_ms: int) -> Batch | None:
        """The batch gathered so far when ``chunk`` would overflow it: train it before adding the
        chunk, which then starts the next one (so its linger counts from after that training)."""
        if self.n and self.n + len(chunk.samples) > self.size:
            return self.take(now_ms)
        return None

    def add(self, chunk: Chunk, now_ms: int, mono: float) -> None:
        """Take a chunk (``overflow`` first)."""
        if len(chunk.samples):
            if not self.n:
                self.first_at_ms, self.first_mono = now_ms, mono
            self.parts.append(chunk.samples)
            self.n += len(chunk.samples)
            self.last_chunk_mono = mono
        self.offsets.update(chunk.offsets)

    def due(self, now_ms: int, mono: float) -> Batch | None:
        """The batch when it is full, or has lingered long enough (that wait is counted as idle)."""
        full = self.n >= self.size
        lingered = self.n > 0 and (mono - self.first_mono) * 1000 >= self.linger_ms
        if not (full or lingered):
            return None
        if not full:
            self.lingered_s += mono - self.last_chunk_mono
        return self.take(now_ms)

    def take(self, now_ms: int) -> Batch:
        """What is gathered, as a batch (possibly empty of samples), and start afresh."""
        batch = Batch(self.parts, self.first_at_ms or now_ms, now_ms, self.offsets)
        self.parts, self.n, self.offsets, self.first_at_ms = [], 0, {}, None
        return batch

    def settled_offsets(self) -> dict[int, int]:
        """With nothing gathered, the offsets of the chunks since the last batch (all of them
        dead letters or empty): safe to resume from. Empty otherwise."""
        if self.n:
            return {}
        done, self.offsets = self.offsets, {}
        return done
