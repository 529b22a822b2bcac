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
