"""The feed's partitions merged by stream time: the order a trainer meets a backlog in.

A consumer with a backlog hands over one partition's records in long runs (aiokafka drains a
partition's whole fetch - up to ``max_partition_fetch_bytes``, thousands of samples - before the
next, in whichever order the fetches completed), so a trainer catching up met partition 0's days
1-3, then partition 1's days 1-3, and so on: a time-shuffled stream, shuffled differently on
every run. Its lifetime AUC moved by 0.02-0.03 between such orders of the same samples (the
feed's one-rank trainer against N ranks, which split the partitions, compared runs of that noise:
docs/streaming.md). ``PartitionMerge`` keeps each partition's parsed records in a lane and hands
over the records of every lane in the order of their *stream time* - the joiner's watermark when
it wrote the sample (``watermark_ms``; its running maximum within the partition, so a partition's
own order is never changed) - ties by partition, so one trainer and N ranks (each merging its
share) meet the stream in the same order, whatever the fetch timing.

A record is handed over only when no partition that still has records on the broker, not yet
fetched, could bring an earlier one (as Kafka Streams' ``max.task.idle.ms``: wait to fetch data
that is there, never for data not yet produced): a caught-up partition does not hold the others
back, so a live trainer's latency is unchanged.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from operator import attrgetter
from typing import Any, Final

import numpy as np

from stream.contract.samples import SampleRecord, decode_records
from stream.learn.sample_batch import SampleBatch

NO_KEY: Final = -(1 << 62)  # before any stream time


@dataclass
class Refused:
    """A record that did not parse (the feed turns it into a dead letter)."""

    record: Any  # the consumer record (topic, partition, offset, key, value)
    reason: str
    detail: str


@dataclass
class Lane:
    """One partition's parsed records not yet handed over, in offset order: samples, and refused
    records at their place (they take the stream time of the record before them)."""

    items: list[SampleRecord | Refused] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)  # running maximum of watermark_ms: non-decreasing
    offsets: list[int] = field(default_factory=list)
    end: int | None = None  # the offset after the last record added
    last_key: int = NO_KEY  # the lane's stream time so far


@dataclass
class Merged:
    """Records handed over: samples in stream-time order, refused records, and per partition the
    offset to resume from once they are done."""

    samples: SampleBatch
    refused: list[Refused]
    offsets: dict[int, int]
    # (S, 3) int64: each sample's place in the merged order - (stream time, partition, offset) - so
    # that N ranks, each merging its own share, can cut rounds on the order of all partitions
    keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))


class PartitionMerge:
    """Per-partition lanes of parsed records, handed over merged by stream time."""

    def __init__(self, partitions: Iterable[int], capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity  # records a lane holds before its partition is no longer fetched
        self.lanes = {p: Lane() for p in sorted(partitions)}

    def room(self, partition: int) -> int:
        """Records the lane may still take (fetch the partition only while positive)."""
        return self.capacity - len(self.lanes[partition].items)

    def buffered(self) -> int:
        return sum(len(lane.items) for lane in self.lanes.values())

    def add(self, partition: int, records: Sequence[Any]) -> None:
        """Parse a partition's fetched records (in offset order) into its lane."""
        if not records:
            return
        lane = self.lanes[partition]
        good, bad = decode_records([r.value for r in records])
        refused = {i: Refused(records[i], exc.reason, exc.message) for i, exc in bad}
        if refused:
            it = iter(good)
            items: list[SampleRecord | Refused] = [refused[i] if i in refused else next(it) for i in range(len(records))]
        else:
            items = list(good)
        if refused:
            key = lane.last_key
            for item in items:
                if isinstance(item, SampleRecord) and item.watermark_ms > key:
                    key = item.watermark_ms
                lane.keys.append(key)
        else:  # the usual chunk: the running maximum in C
            lane.keys += accumulate(map(attrgetter("watermark_ms"), good), max, initial=lane.last_key)
            del lane.keys[-len(good) - 1]  # the initial value
            key = lane.keys[-1]
        lane.items += items
        lane.offsets += [r.offset for r in records]
        lane.last_key = key
        lane.end = records[-1].offset + 1

    def forget(self, partition: int) -> None:
        """Drop a partition's lane (its consumer position was moved: a recreated topic)."""
        self.lanes[partition] = Lane()

    def bound(self, partition: int, waiting: Collection[int]) -> int | None:
        """The latest stream time lane ``partition`` may hand over: records go out in the order of
        (stream time, partition), and a partition in ``waiting`` (records on the broker, not yet
        fetched) may still bring records from its lane's time on; None: no bound."""
        times = [self.lanes[q].last_key - (q < partition) for q in waiting if q != partition and q in self.lanes]
        return min(times) if times else None

    def take(self, limit: int, waiting: Collection[int]) -> Merged | None:
        """At most ``limit`` records (samples and refused ones), merged by stream time (ties: the
        lower partition first), that no waiting partition can precede; None when nothing can be
        handed over. While a partition is behind, exactly ``limit`` or nothing: the trainer's
        batches of a backlog then do not depend on how its fetches were timed."""
        if limit > self.capacity:  # the earliest waiting lane could then never make a whole chunk
            raise ValueError(f"limit {limit} is over the lanes' capacity {self.capacity}")
        parts: list[tuple[int, Lane, int]] = []  # (partition, lane, records it may give)
        for p, lane in self.lanes.items():
            bound = self.bound(p, waiting)
            n = len(lane.keys) if bound is None else bisect.bisect_right(lane.keys, bound)
            parts.append((p, lane, min(n, limit)))
        keys = np.fromiter((k for _, lane, n in parts for k in lane.keys[:n]), np.int64)
        lane_of = np.repeat(np.arange(len(parts)), [n for _, _, n in parts])
        if len(keys) < limit and any(q in self.lanes for q in waiting):
            return None  # behind: only whole chunks, so a backlog is cut into the same batches every run
        order = np.argsort(keys, kind="stable")[:limit]  # lanes concatenated in partition order
        counts = np.bincount(lane_of[order], minlength=len(parts)).tolist()
        pool = [r for _, lane, n in parts for r in lane.items[:n]]
        merged = [pool[i] for i in order.tolist()]
        samples = [r for r in merged if isinstance(r, SampleRecord)]
        refused = [r for r in merged if isinstance(r, Refused)] if len(samples) < len(merged) else []
        offs = np.fromiter((o for _, lane, n in parts for o in lane.offsets[:n]), np.int64)
        place = np.stack([keys[order], np.asarray([p for p, _, _ in parts], np.int64)[lane_of[order]], offs[order]],
                         axis=1)  # (M, 3)
        if refused:
            place = place[np.fromiter((isinstance(r, SampleRecord) for r in merged), bool, count=len(merged))]
        offsets: dict[int, int] = {}
        for (p, lane, _), n in zip(parts, counts, strict=True):
            if not n:
                continue
            del lane.items[:n], lane.keys[:n], lane.offsets[:n]
            # everything before the next record still held is handed over now
            upto = lane.offsets[0] if lane.offsets else lane.end
            assert upto is not None  # the lane had records
            offsets[p] = upto
        if not samples and not refused and not offsets:
            return None
        return Merged(SampleBatch.from_records(samples), refused, offsets, place)


__all__ = ["Lane", "Merged", "PartitionMerge", "Refused"]
