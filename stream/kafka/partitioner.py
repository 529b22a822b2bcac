"""Kafka's default partition of a keyed record (murmur2 of the key), quicker than aiokafka's.

The joiner sends about one sample per event, keyed by impression id, to the partition the
producer's own partitioner would pick (``BatchSender``). aiokafka's ``DefaultPartitioner`` is a
pure-Python murmur2 that reads the key a byte at a time (~6 us for a 30-byte key, plus ~3 us of
metadata lookups in ``AIOKafkaProducer._partition``): 5% of the joiner's CPU in its profile. This
is the same function (Java's ``Utils.murmur2``, ``toPositive``, modulo the partition count) over
the key's 32-bit little-endian words at once; ``tests/unit/test_partitioner.py`` checks it against
aiokafka's on random keys. ``producer_partition_of`` uses it only where the producer's
partitioner is aiokafka's default one, and defers to the producer otherwise.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import lru_cache
from typing import Any

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


@lru_cache(maxsize=64)
def _words(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}I")


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of ``data`` (unsigned 32-bit), as ``aiokafka.partitioner.murmur2``."""
    length = len(data)
    h = _SEED ^ length
    n4 = length >> 2
    if n4:
        for k in _words(n4).unpack_from(data):
            k = (k * _M) & _MASK
            k ^= k >> 24
            h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    extra = length & 3
    if extra:
        tail = length & ~3
        if extra >= 3:
            h ^= data[tail + 2] << 16
        if extra >= 2:
            h ^= data[tail + 1] << 8
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def _compiled_murmur2() -> Callable[[bytes], int]:
    """``murmur2`` in C when the joiner's compiled module is built (0.05 us against 2.8 for a
    30-byte key here; ``tests/unit/test_partitioner.py`` checks both against aiokafka's)."""
    from stream.join import fast

    return fast._fastjoin.murmur2 if fast.AVAILABLE else murmur2


_murmur2 = _compiled_murmur2()


def key_partition(key: bytes, partitions: list[int]) -> int:
    """The partition of ``key`` among ``partitions`` (all of the topic's, as the producer lists them)."""
    return partitions[(_murmur2(key) & 0x7FFFFFFF) % len(partitions)]


def producer_partition_of(producer: Any, fallback: Callable[[str, bytes], int]) -> Callable[[str, bytes], int]:
    """``(topic, key) -> partition`` as aiokafka ``producer`` would pick it for a keyed record:
    with ``key_partition`` while its partitioner is aiokafka's ``DefaultPartitioner`` and it knows
    the topic, with ``fallback`` otherwise. A topic's partitions are listed once per metadata
    update (aiokafka's ``partitions_for_topic`` builds a set per call: ~2% of the joiner's CPU,
    round 15), forgotten by the metadata's listener on each update, so a topic that grew is
    partitioned as the producer would then."""
    from aiokafka.partitioner import DefaultPartitioner

    if not isinstance(getattr(producer, "_partitioner", None), DefaultPartitioner):
        return fallback
    metadata = producer._metadata
    listed: dict[str, list[int]] = {}

    def forget(_cluster: Any) -> None:
        listed.clear()

    metadata.add_listener(forget)  # ClusterMetadata calls it after each update
    murmur = _murmur2

    def partition_of(topic: str, key: bytes) -> int:
        partitions = listed.get(topic)
        if partitions is None:
            found = metadata.partitions_for_topic(topic)
            if not found:
                return fallback(topic, key)
            partitions = listed[topic] = list(found)  # the producer's own order (``_partition``)
        return partitions[(murmur(key) & 0x7FFFFFFF) % len(partitions)]  # key_partition, inline (per record)

    return partition_of
