"""The joiner's murmur2 partitioner is aiokafka's, byte for byte, on any key."""

from __future__ import annotations

from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.join import fast
from stream.kafka import partitioner
from stream.kafka.partitioner import key_partition, murmur2, producer_partition_of


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=80))
def test_murmur2_is_kafkas(key: bytes) -> None:
    assert murmur2(key) == aiokafka_murmur2(key)
    assert fast._fastjoin.murmur2(key) == aiokafka_murmur2(key)  # the compiled one key_partition uses


def test_key_partition_uses_the_compiled_murmur2() -> None:
    assert fast.AVAILABLE and partitioner._murmur2 is fast._fastjoin.murmur2


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(min_value=1, max_value=64))
def test_key_partition_is_the_default_partitioners(key: bytes, n: int) -> None:
    parts = list(range(n))
    assert key_partition(key, parts) == DefaultPartitioner()(key, parts, parts)


class _Metadata:
    """What ``producer_partition_of`` reads of aiokafka's ``ClusterMetadata``."""

    def __init__(self, topics: dict[str, set[int]]) -> None:
        self.topics = topics
        self.listeners: list[Any] = []
        self.lookups = 0

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        self.lookups += 1
        return self.topics.get(topic)

    def add_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def update(self, topics: dict[str, set[int]]) -> None:
        """As ``ClusterMetadata.update_metadata``: new partitions, then each listener called."""
        self.topics = topics
        for listener in self.listeners:
            listener(self)


class _Producer:
    def __init__(self, partitioner: Any, topics: dict[str, set[int]]) -> None:
        self._partitioner = partitioner
        self._metadata = _Metadata(topics)


def _fallback(topic: str, key: bytes) -> int:
    return -1


def test_the_producers_partition_or_its_own_answer() -> None:
    producer = _Producer(DefaultPartitioner(), {"samples": {0, 1, 2, 3}})
    partition_of = producer_partition_of(producer, _fallback)
    for i in range(200):
        key = f"imp-{i}".encode()
        assert partition_of("samples", key) == DefaultPartitioner()(key, [0, 1, 2, 3], [0, 1, 2, 3])
    assert partition_of("unknown-topic", b"k") == -1  # the producer knows no partitions: it decides


def test_another_partitioner_is_left_to_the_producer() -> None:
    producer = _Producer(lambda key, parts, available: parts[0], {"samples": {0, 1}})
    assert producer_partition_of(producer, _fallback) is _fallback


def test_a_topics_partitions_are_listed_once_per_metadata_update() -> None:
    producer = _Producer(DefaultPartitioner(), {"samples": {0, 1}})
    partition_of = producer_partition_of(producer, _fallback)
    keys = [f"imp-{i}".encode() for i in range(50)]
    assert [partition_of("samples", k) for k in keys] == [DefaultPartitioner()(k, [0, 1], [0, 1]) for k in keys]
    assert producer._metadata.lookups == 1
    producer._metadata.update({"samples": {0, 1, 2, 3, 4}})  # the topic grew
    assert [partition_of("samples", k) for k in keys] == [DefaultPartitioner()(k, [0, 1, 2, 3, 4], [0]) for k in keys]
    assert producer._metadata.lookups == 2


def test_aiokafkas_metadata_calls_its_listeners_on_each_update() -> None:
    """What the listing above relies on, in aiokafka itself."""
    import inspect

    from aiokafka.cluster import ClusterMetadata

    assert hasattr(ClusterMetadata, "add_listener")
    assert "listener(self)" in inspect.getsource(ClusterMetadata.update_metadata)
