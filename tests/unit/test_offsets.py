"""Offsets against high watermarks: consumer lag (trainer and scorer) and recreated topics (every client)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.errors import IllegalStateError

from stream.kafka import offsets
from stream.learn.feed import SampleFeed


def test_trainer_feed_lag_counts_untrained_records_per_partition() -> None:
    feed = SampleFeed({"bootstrap_servers": "unused"}, "samples", {0: 5}, chunk_size=10)
    assert feed.lag({}) is None  # no fetch response yet
    feed.highwater.update({0: 20, 1: 7})
    assert feed.lag({}) == (20 - 5) + 7  # partition 1 starts at 0
    assert feed.lag({0: 20, 1: 3}) == 4
    assert feed.lag({0: 25, 1: 7}) == 0  # never negative


class FakeConsumer:
    def __init__(self, hw: dict[int, int | None], pos: dict[int, int]) -> None:
        self.hw, self.pos = hw, pos

    def assignment(self) -> set[int]:
        return set(self.hw)

    def highwater(self, tp: int) -> int | None:
        return self.hw[tp]

    def position(self, tp: int, timeout_ms: Any = None) -> int:
        if tp not in self.pos:
            raise TimeoutError("position unknown")
        return self.pos[tp]

    def seek_to_beginning(self, tp: int) -> None:
        self.pos[tp] = 0


def test_scorer_lag_is_highwater_minus_position() -> None:
    assert offsets.lag_sync(FakeConsumer({0: None}, {0: 0})) is None
    assert offsets.lag_sync(FakeConsumer({0: 10, 1: 4, 2: 9}, {0: 7, 1: 4})) == 3  # 2: position unknown


class _TP(int):
    topic = "scores"

    @property
    def partition(self) -> int:
        return int(self)


def test_kafka_python_consumer_rereads_a_partition_recreated_under_it() -> None:
    c = FakeConsumer({_TP(0): 10, _TP(1): 3, _TP(2): None}, {_TP(0): 10, _TP(1): 8, _TP(2): 50})
    assert offsets.rewind_sync(c) == [1]  # 1 read to 8 but the log ends at 3; 0 is at its end; 2 unknown
    assert c.pos == {0: 10, 1: 0, 2: 50}


class AsyncConsumer:
    """aiokafka's shape (``seek`` a plain call) or faust's (``seek`` a coroutine)."""

    def __init__(self, pos: dict[int, int], faust: bool) -> None:
        self.pos, self.faust = pos, faust

    async def position(self, tp: int) -> int:
        if tp not in self.pos:
            raise IllegalStateError(f"Partition {tp} is not assigned")
        return self.pos[tp]

    def seek(self, tp: int, offset: int) -> Any:
        async def later() -> None:
            self.pos[tp] = offset

        if self.faust:
            return later()
        self.pos[tp] = offset
        return None


def test_aiokafka_and_faust_consumers_reread_a_recreated_partition() -> None:
    for faust in (False, True):
        c = AsyncConsumer({_TP(0): 12, _TP(1): 4, _TP(2): 9}, faust)
        tps = [_TP(0), _TP(1), _TP(2), _TP(3)]  # 3: revoked by a rebalance after the caller listed it
        rewound = asyncio.run(offsets.rewind_async(c, tps, {_TP(0): 5, _TP(1): 4, _TP(2): None, _TP(3): 1}))
        assert rewound == [0] and c.pos == {0: 0, 1: 4, 2: 9}


def test_a_partition_taken_away_by_a_rebalance_has_no_high_watermark() -> None:
    class Revoked:
        def highwater(self, tp: int) -> int:
            raise AssertionError("Partition is not assigned")  # what aiokafka does

    assert offsets.highwater(Revoked(), 0) is None
    assert offsets.highwater(FakeConsumer({0: 7}, {}), 0) == 7


def test_free_ports_are_below_the_ephemeral_range_and_never_handed_out_twice() -> None:
    import socket

    from stream.kafka.broker import _ephemeral_range, free_port

    low = _ephemeral_range()[0]
    ports = [free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)  # never the same port twice in a process
    assert all(p < low for p in ports)  # outgoing connections cannot take them meanwhile
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # and they are free


def test_a_stale_high_watermark_seen_once_does_not_rewind_and_one_that_stays_does() -> None:
    """The rule (stream/kafka/offsets.py): a partition is recreated when its position *stays* past its
    high watermark; a live partition's next fetch answer lifts the high watermark (a restarted
    joiner saw a stale one until then, and rewinding re-read every record from offset 0)."""
    now = [0.0]
    for faust in (False, True):
        guard = offsets.RecreatedGuard(confirm_s=30, clock=lambda: now[0])
        c = AsyncConsumer({_TP(0): 12, _TP(1): 4}, faust)
        tps = [_TP(0), _TP(1)]
        assert asyncio.run(offsets.rewind_async(c, tps, {_TP(0): 5, _TP(1): 4}, guard)) == []  # first sight
        now[0] += 20
        assert asyncio.run(offsets.rewind_async(c, tps, {_TP(0): 13, _TP(1): 4}, guard)) == []  # a fetch answered
        now[0] += 40
        assert asyncio.run(offsets.rewind_async(c, tps, {_TP(0): 5, _TP(1): 4}, guard)) == []  # stale again: anew
        now[0] += 29
        assert asyncio.run(offsets.rewind_async(c, tps, {_TP(0): 5, _TP(1): 4}, guard)) == []  # not yet 30 s
        assert c.pos == {0: 12, 1: 4}
        now[0] += 1
        assert asyncio.run(offsets.rewind_async(c, tps, {_TP(0): 5, _TP(1): 4}, guard)) == [0]  # stayed 30 s
        assert c.pos == {0: 0, 1: 4}
    # the scorer's client (kafka-python) likewise
    now[0] = 0.0
    guard = offsets.RecreatedGuard(confirm_s=30, clock=lambda: now[0])
    k = FakeConsumer({_TP(0): 3}, {_TP(0): 8})
    assert offsets.rewind_sync(k, guard) == []
    k.hw[_TP(0)] = 9  # the fetch answered: it was live
    now[0] += 60
    assert offsets.rewind_sync(k, guard) == [] and k.pos == {0: 8}
    k.hw[_TP(0)] = 3
    assert offsets.rewind_sync(k, guard) == []
    now[0] += 30
    assert offsets.rewind_sync(k, guard) == [0] and k.pos == {0: 0}


def test_a_partition_whose_position_moves_is_not_confirmed() -> None:
    now = [0.0]
    guard = offsets.RecreatedGuard(confirm_s=10, clock=lambda: now[0])
    assert not guard.confirmed("p", 8, 3)
    now[0] = 11.0
    assert not guard.confirmed("p", 9, 3)  # it read on: the clock starts again
    now[0] = 21.0
    assert guard.confirmed("p", 9, 3)
    assert offsets.RecreatedGuard(confirm_s=0).confirmed("p", 9, 3)  # 0: at once
