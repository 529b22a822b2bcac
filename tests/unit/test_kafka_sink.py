"""The simulator's Kafka sink says when the broker refused records, instead of losing them
silently: a run judged against the simulator's answer key must have delivered every record."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from simulators.faults import Record
from simulators.kafka_sink import Background, NotDelivered, produce
from stream.ops.settings import Settings


class FakeFuture:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def add_errback(self, fn: Any) -> None:
        if self.error is not None:
            fn(self.error)


class FakeProducer:
    """Refuses every record whose key is in ``refused`` (as kafka-python reports a failed batch:
    through the send future's errback, after its retries)."""

    refused: ClassVar[set[bytes]] = set()
    sent: ClassVar[list[bytes]] = []

    def __init__(self, **config: Any) -> None:
        pass

    def send(self, topic: str, key: bytes, value: bytes, timestamp_ms: int) -> FakeFuture:
        self.sent.append(key)
        return FakeFuture(TimeoutError("batch expired") if key in self.refused else None)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def records(n: int) -> list[Record]:
    return [Record("impression", f"i{i}".encode(), b"{}", 1_000 + i, 1_000 + i) for i in range(n)]


def test_refused_records_raise_not_delivered_after_the_rest_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    import kafka

    monkeypatch.setattr(kafka, "KafkaProducer", FakeProducer)
    FakeProducer.refused, FakeProducer.sent = {b"i3"}, []
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1")
    with pytest.raises(NotDelivered) as err:
        produce(records(6), settings)
    assert len(FakeProducer.sent) == 6  # the others still went out
    assert err.value.failed[0][1] == b"i3" and "1 of 6 records were not delivered" in str(err.value)
    FakeProducer.refused, FakeProducer.sent = set(), []
    assert produce(records(6), settings) == {settings.topic_impressions: 6}


def test_background_hands_the_producers_error_to_its_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    import kafka

    monkeypatch.setattr(kafka, "KafkaProducer", FakeProducer)
    FakeProducer.refused, FakeProducer.sent = {b"i0"}, []
    job = Background(produce, records(2), Settings(kafka_bootstrap_servers="127.0.0.1:1"))
    job.start()
    with pytest.raises(NotDelivered):
        job.result()
