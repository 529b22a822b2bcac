"""Consumer lag: high watermark from fetch responses minus what is consumed (trainer and scorer)."""

from __future__ import annotations

from typing import Any

from stream.learn.feed import SampleFeed
from stream.serve.scorer import consumer_lag


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


def test_scorer_lag_is_highwater_minus_position() -> None:
    assert consumer_lag(FakeConsumer({0: None}, {0: 0})) is None
    assert consumer_lag(FakeConsumer({0: 10, 1: 4, 2: 9}, {0: 7, 1: 4})) == 3  # 2: position unknown
