"""``BatchSender``: records gathered per topic partition and produced as whole record batches.

aiokafka's ``send()`` costs about 25 us per record (a coroutine, partition lookup, accumulator
bookkeeping); appending to a ``BatchBuilder`` and submitting it with ``send_batch()`` costs
about 8 us per record, acknowledgements included (measured on the embedded broker). The joiner
produces one changelog record and about one sample per event, so it gathers them here and sends
them once per sweep. Records of one partition keep their order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from aiokafka.producer.message_accumulator import BatchBuilder

try:
    from stream.kafka import _records
except ImportError:  # pragma: no cover - built by every install here (setup.py); aiokafka's builder otherwise
    _records = None  # type: ignore[assignment]

PartitionOf = Callable[[str, bytes], int]
_NO_HEADERS: list[Any] = []  # never changed


def writer_of(producer: Any) -> Callable[[], Any] | None:
    """A maker of ``RecordBatchWriter``s (``stream/kafka/_records.c``) for ``producer``'s record
    batches, when they are the writer's kind: magic 2 (aiokafka's only), no compression, neither
    idempotent nor transactional (the producer then stamps each batch with ``_set_producer_state``,
    which asserts aiokafka's own builder). None otherwise, and for anything not aiokafka's
    ``AIOKafkaProducer`` (its ``_message_accumulator``).

    The writer is aiokafka's ``DefaultRecordBatchBuilder`` in C - the same bytes, checked by
    ``tests/unit/test_sender.py`` - with its CRC32C computed by the ``crc32c`` package (in hardware
    where the CPU has it: aiokafka's own is software, ~2 GB/s, which was most of building a batch)
    and a run of one partition's records appended in one call (``append_many``): with the sender's
    own work, 0.18 against 0.45 us a record, built (``python -m bench.bulk_loop``; docs/joiner.md,
    round 21)."""
    acc = getattr(producer, "_message_accumulator", None)
    if _records is None or acc is None:
        return None
    if getattr(acc, "_compression_type", None) != 0 or getattr(acc, "_txn_manager", 0) is not None:
        return None
    size = getattr(acc, "_batch_size", None)
    if not isinstance(size, int):
        return None
    writer = _records.RecordBatchWriter
    return lambda: writer(size)


class _Open:
    """A partition's open record batch. aiokafka's ``BatchBuilder.append`` is a keyword-only Python
    wrapper (serializers, a closed check, a count) around the compiled record builder's ``append``;
    called on that directly, with the flush's timestamp, a record costs 0.08 us against 0.22
    (issue 16, round 19) - about two records per event. With ``writer`` (``writer_of``), that
    compiled builder is a ``RecordBatchWriter``, whose ``append_many`` takes a run of records
    (``many``). ``count`` is the wrapper's own count (``record_count()``), written back when the
    batch is closed or taken. A builder that is not aiokafka's (tests' stand-ins) goes through its
    own ``append``."""

    __slots__ = ("append", "builder", "count", "many")

    def __init__(self, builder: Any, writer: Callable[[], Any] | None = None) -> None:
        self.builder = builder
        inner = getattr(builder, "_builder", None) if type(builder) is BatchBuilder else None
        self.many: Callable[[int, int, list[Any], int], int] | None = None
        if inner is not None and writer is not None and builder._key_serializer is None \
                and builder._value_serializer is None and builder._relative_offset == 0:  # fmt: skip
            inner = builder._builder = writer()
            self.many = inner.append_many
        self.append: Callable[..., Any] | None = inner.append if inner is not None else None
        self.count: int = builder._relative_offset if inner is not None else 0

    def add(self, key: bytes | None, value: bytes | None, ts: int) -> bool:
        """Append one record; False when the batch is full (it is closed then)."""
        append = self.append
        if append is None:
            return self.builder.append(key=key, value=value, timestamp=None) is not None
        if append(self.count, ts, key, value, _NO_HEADERS) is None:
            self.close()
            return False
        self.count += 1
        return True

    def close(self) -> Any:
        """The builder, closed, with its record count as aiokafka's wrapper keeps it."""
        if self.append is not None:
            self.builder._relative_offset = self.count
            self.builder.close()
            self.append = self.many = None  # closed: nothing more goes in through the compiled builder
        return self.builder


def _now_ms() -> int:
    """The records' timestamp (CreateTime), as aiokafka stamps a record given none."""
    return int(time.time() * 1000)


class BatchSender:
    """Gather records per (topic, partition); ``flush()`` submits them as record batches.

    ``producer`` is an ``aiokafka.AIOKafkaProducer``; ``partition_of(topic, key)`` picks the
    partition of a keyed record (the producer's own partitioner, so keys land where a plain
    ``send`` would put them).
    """

    def __init__(self, producer: Any, partition_of: PartitionOf) -> None:
        self._producer = producer
        self._partition_of = partition_of
        self._writer = writer_of(producer)
        self._open: dict[tuple[str, int], _Open] = {}
        self._full: list[tuple[str, int, Any]] = []
        self.pending = 0  # records added since the last flush

    def _slot(self, tp: tuple[str, int]) -> _Open:
        slot = self._open[tp] = _Open(self._producer.create_batch(), self._writer)
        return slot

    def _next_batch(self, tp: tuple[str, int], full: _Open) -> _Open:
        """``full`` goes out as it is; a new batch is opened for ``tp``."""
        self._full.append((tp[0], tp[1], full.close()))
        return self._slot(tp)

    def _roll(self, tp: tuple[str, int], full: _Open, key: bytes | None, value: bytes | None, ts: int) -> _Open:
        """``full`` has no room for the record: it goes out as it is, the record starts a new batch."""
        slot = self._next_batch(tp, full)
        if not slot.add(key, value, ts):
            raise ValueError(f"a record of {len(value or b'')} bytes does not fit in a batch for {tp[0]}")
        return slot

    def add(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
        """Queue one record (``value=None`` is a tombstone); ``partition`` defaults to the key's."""
        if partition is None:  # no cache of keys: a topic's partitions may change
            partition = self._partition_of(topic, key)
        tp = (topic, partition)
        slot = self._open.get(tp) or self._slot(tp)
        ts = _now_ms()
        if not slot.add(key, value, ts):
            self._roll(tp, slot, key, value, ts)
        self.pending += 1

    def add_all(self, records: Iterable[tuple[str, bytes, bytes | None]]) -> None:
        """``add`` of each ``(topic, key, value)`` in order, each to its key's partition (the
        join's outputs of a batch: one timestamp and no call per record but the partitioner's)."""
        partition_of = self._partition_of
        opened = self._open
        ts = _now_ms()
        n = 0
        try:
            for topic, key, value in records:
                tp = (topic, partition_of(topic, key))
                slot = opened.get(tp) or self._slot(tp)
                append = slot.append  # ``_Open.add``, inline (per record)
                if append is None:  # not aiokafka's builder
                    if not slot.add(key, value, ts):
                        self._roll(tp, slot, key, value, ts)
                elif append(slot.count, ts, key, value, _NO_HEADERS) is None:  # full
                    self._roll(tp, slot, key, value, ts)
                else:
                    slot.count += 1
                n += 1
        finally:
            self.pending += n

    def add_to(self, topic: str, partition: int, records: Iterable[tuple[bytes, bytes | None]]) -> None:
        """``add`` of each ``(key, value)`` to one ``partition`` of ``topic``, in order (a flush's
        changelog records of a partition: one lookup of its batch, not one per record)."""
        tp = (topic, partition)
        slot = self._open.get(tp) or self._slot(tp)
        ts = _now_ms()
        n = 0
        items = records if type(records) is list else list(records)
        try:
            while n < len(items):
                many = slot.many
                if many is not None:  # the writer: a run of records per call, a new batch when one is full
                    taken = many(slot.count, ts, items, n)
                    slot.count += taken
                    n += taken
                    if n < len(items):
                        slot = self._next_batch(tp, slot)  # (an empty batch takes at least one record)
                    continue
                key, value = items[n]
                if not slot.add(key, value, ts):
                    slot = self._roll(tp, slot, key, value, ts)
                n += 1
        finally:
            self.pending += n

    def seal(self, topic: str, partition: int, key: bytes, value: bytes | None = None) -> None:
        """End the partition's records with ``key``/``value`` alone in a record batch of its own,
        after everything queued for it. A broker whose ListOffsets answers the start of the last
        record batch + 1 (Tansu, BROKER.md) then still reports the true end of the partition: a
        faust changelog's recovery reads to that end, and would otherwise stop at the first
        record of a flush's last batch."""
        tp = (topic, partition)
        slot = self._open.pop(tp, None)
        if slot is not None:
            self._full.append((topic, partition, slot.close()))
        last = _Open(self._producer.create_batch(), self._writer)
        if not last.add(key, value, _now_ms()):
            raise ValueError(f"a seal of {len(value or b'')} bytes does not fit in a batch for {topic}")
        self._full.append((topic, partition, last.close()))
        self.pending += 1

    def take(self) -> list[tuple[str, int, Any]]:
        """Everything queued so far, as record batches (topic, partition, builder); the sender
        starts afresh. Submit them with ``submit()``."""
        batches = self._full
        batches.extend((tp[0], tp[1], slot.close()) for tp, slot in self._open.items())
        self._full, self._open, self.pending = [], {}, 0
        return batches

    async def flush(self) -> list[Sent]:
        """Submit everything queued, in order per partition; one ``Sent`` per record batch."""
        return await self.submit(self.take())

    async def submit(self, batches: list[tuple[str, int, Any]]) -> list[Sent]:
        """Submit batches taken with ``take()``, in order; one ``Sent`` per record batch."""
        send = self._producer.send_batch
        return [
            Sent(topic, partition, b.record_count(), await send(b, topic, partition=partition))
            for topic, partition, b in batches
        ]


class Sent(NamedTuple):
    """A submitted record batch; ``ack`` resolves to its ``RecordMetadata`` (``offset``: the first)."""

    topic: str
    partition: int
    records: int
    ack: asyncio.Future[Any]

    async def last_offset(self) -> int:
        """Wait for the broker's acknowledgement; the offset of the batch's last record."""
        meta = await self.ack
        return int(meta.offset) + self.records - 1
