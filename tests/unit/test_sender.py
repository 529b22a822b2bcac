"""``BatchSender`` with aiokafka's real ``BatchBuilder`` and a recording stand-in for the broker:
records grouped per topic partition in order, a full batch rolls over to a new one (an oversized
record alone in one), and ``Sent.last_offset`` is the offset of the batch's last record."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder

from stream.kafka.sender import BatchSender, Sent


class Producer:
    """What BatchSender uses of AIOKafkaProducer; the 'broker' gives offsets per partition.
    ``writer``: with the accumulator settings ``writer_of`` reads (no compression, no
    transactions), so that the batches are ``RecordBatchWriter``s under aiokafka's wrapper."""

    def __init__(self, batch_size: int = 16_384, writer: bool = False) -> None:
        self.batch_size = batch_size
        if writer:
            self._message_accumulator = SimpleNamespace(_batch_size=batch_size, _compression_type=0, _txn_manager=None)
        self.sent: list[tuple[str, int, list[tuple[bytes | None, bytes | None]]]] = []
        self.next_offset: dict[tuple[str, int], int] = {}

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_size, 0)  # no compression

    async def send_batch(self, builder: BatchBuilder, topic: str, *, partition: int) -> asyncio.Future[Any]:
        buf = builder._build()  # what AIOKafkaProducer.send_batch does
        from aiokafka.record.default_records import DefaultRecordBatch

        records = [(r.key, r.value) for r in DefaultRecordBatch(bytes(buf))]
        self.sent.append((topic, partition, records))
        base = self.next_offset.get((topic, partition), 100)
        self.next_offset[(topic, partition)] = base + len(records)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(SimpleNamespace(offset=base))
        return fut


def by_key_length(topic: str, key: bytes) -> int:
    return len(key) % 3


WRITER = pytest.mark.parametrize("writer", [False, True], ids=["aiokafka-builder", "record-batch-writer"])


@WRITER
def test_records_are_sent_per_partition_in_order_and_the_sender_starts_afresh(writer: bool) -> None:
    p = Producer(writer=writer)
    calls: list[tuple[str, bytes]] = []

    def partition_of(topic: str, key: bytes) -> int:
        calls.append((topic, key))
        return by_key_length(topic, key)

    s = BatchSender(p, partition_of)
    s.add("a", b"k1", b"v1")  # partition 2
    s.add("a", b"k", b"v2")  # partition 1
    s.add("a", b"k2", b"v3")  # partition 2
    s.add("b", b"k1", None)  # a tombstone, another topic
    s.add("a", b"k1", b"v4", partition=0)  # an explicit partition
    s.add("a", b"k1", b"v5")  # k1's partition in topic a again
    assert s.pending == 6
    assert calls == [("a", b"k1"), ("a", b"k"), ("a", b"k2"), ("b", b"k1"), ("a", b"k1")]  # each keyed record

    async def go() -> list[Sent]:
        return await s.flush()

    sent = asyncio.run(go())
    assert s.pending == 0
    got = {(t, part): recs for t, part, recs in p.sent}
    assert got == {
        ("a", 2): [(b"k1", b"v1"), (b"k2", b"v3"), (b"k1", b"v5")],
        ("a", 1): [(b"k", b"v2")],
        ("b", 2): [(b"k1", None)],
        ("a", 0): [(b"k1", b"v4")],
    }
    assert [(x.topic, x.partition, x.records) for x in sent] == [(t, part, len(r)) for t, part, r in p.sent]
    assert asyncio.run(s.flush()) == []  # nothing queued any more


@WRITER
def test_a_full_batch_rolls_over_in_order_and_last_offset_is_its_last_record(writer: bool) -> None:
    p = Producer(batch_size=300, writer=writer)
    s = BatchSender(p, by_key_length)
    values = [f"value-{i:03d}".encode() * 4 for i in range(20)]  # ~40 bytes each: several batches
    for v in values:
        s.add("t", b"key", v, partition=0)

    async def go() -> list[int]:
        sent = await s.flush()
        return [await x.last_offset() for x in sent]

    lasts = asyncio.run(go())
    assert len(p.sent) > 2  # rolled over
    assert [v for _, _, recs in p.sent for _, v in recs] == values  # every record once, in order
    sizes = [len(recs) for _, _, recs in p.sent]
    # offsets from 100 on: each batch's last offset is its first plus its records minus one
    ends, first = [], 100
    for n in sizes:
        ends.append(first + n - 1)
        first += n
    assert lasts == ends and lasts[-1] == 100 + len(values) - 1


@WRITER
def test_a_record_larger_than_the_batch_size_goes_whole_in_a_batch_of_its_own(writer: bool) -> None:
    p = Producer(batch_size=100, writer=writer)
    s = BatchSender(p, by_key_length)
    s.add("t", b"k", b"x" * 10, partition=0)
    s.add("t", b"k", b"y" * 5000, partition=0)  # an empty batch takes one record of any size
    s.add("t", b"k", b"z" * 10, partition=0)
    asyncio.run(s.flush())
    assert [[v for _, v in recs] for _, _, recs in p.sent] == [[b"x" * 10], [b"y" * 5000], [b"z" * 10]]


def test_each_keyed_record_goes_where_partition_of_says_now() -> None:
    """No cache of keys: when a topic's partitions change, the next record of a key follows the
    partitioner (``producer_partition_of`` lists a topic's partitions afresh on each metadata update)."""
    count = [2]

    def partition_of(topic: str, key: bytes) -> int:
        return len(key) % count[0]

    p = Producer(batch_size=10_000_000)
    s = BatchSender(p, partition_of)
    s.add("t", b"abc", b"1")  # 3 % 2 = 1
    count[0] = 4  # the topic grew
    s.add("t", b"abc", b"2")  # 3 % 4 = 3
    asyncio.run(s.flush())
    assert sorted((part, [v for _, v in recs]) for _, part, recs in p.sent) == [(1, [b"1"]), (3, [b"2"])]


@WRITER
def test_add_to_is_add_of_each_record_to_one_partition_in_order_and_rolls_over(writer: bool) -> None:
    """(With the writer, ``add_to`` appends runs of records with ``append_many``, ``add`` one at a time.)"""
    records = [(b"k%d" % i, b"v" * 60 + b"%d" % i) for i in range(12)] + [(b"gone", None)]
    one, many = Producer(batch_size=300, writer=writer), Producer(batch_size=300, writer=writer)
    a, b = BatchSender(one, by_key_length), BatchSender(many, by_key_length)
    a.add("other", b"x", b"y")
    b.add("other", b"x", b"y")
    for key, value in records:
        a.add("log", key, value, partition=3)
    b.add_to("log", 3, iter(records))
    assert b.pending == a.pending == len(records) + 1
    assert all((slot.many is not None) == writer for slot in b._open.values())  # the writer, or aiokafka's
    asyncio.run(a.flush())
    asyncio.run(b.flush())
    assert many.sent == one.sent
    assert len([s for s in many.sent if s[0] == "log"]) > 1  # the records filled more than one batch
    assert [r for t, part, recs in many.sent if t == "log" for r in recs] == records


def test_records_appended_to_aiokafkas_builder_directly_decode_as_through_its_wrapper() -> None:
    """``BatchSender`` appends to aiokafka's compiled record builder under its ``BatchBuilder``
    wrapper (the wrapper's Python was ~60% of an append): the batch must decode to the same
    records, with the count the producer reads (``record_count``), a timestamp of the add, and
    roll over when full exactly as through the wrapper. Fails loudly if aiokafka's wrapper no
    longer has the builder and count this relies on."""
    import time

    from aiokafka.record.default_records import DefaultRecordBatch

    from stream.kafka.sender import _Open

    assert _Open(BatchBuilder(16_384, 0)).append is not None, "aiokafka's BatchBuilder changed: see stream/kafka/sender.py"
    records = [("log", b"k%d" % i, (b"v" * 50 + b"%d" % i) if i % 5 else None) for i in range(40)]
    direct, wrapped = Producer(batch_size=700), Producer(batch_size=700)
    a = BatchSender(direct, lambda topic, key: 0)
    before = int(time.time() * 1000)
    a.add_all(records)
    a.add("log", b"last", b"x")
    builders = [b for _, _, b in a.take()]
    after = int(time.time() * 1000)
    # the same records through aiokafka's own wrapper, rolling over the same way
    ref: list[BatchBuilder] = [wrapped.create_batch()]
    for _, key, value in [*records, ("log", b"last", b"x")]:
        if ref[-1].append(key=key, value=value, timestamp=None) is None:
            ref.append(wrapped.create_batch())
            assert ref[-1].append(key=key, value=value, timestamp=None) is not None
    assert len(builders) == len(ref) > 2
    for got, want in zip(builders, ref, strict=True):
        assert got.record_count() == want.record_count() and got.closed()
        got_recs = list(DefaultRecordBatch(bytes(got._build())))
        want_recs = list(DefaultRecordBatch(bytes(want._build())))
        assert [(r.offset, r.key, r.value, r.headers) for r in got_recs] == [
            (r.offset, r.key, r.value, r.headers) for r in want_recs
        ]
        assert all(before <= r.timestamp <= after for r in got_recs)


def test_the_record_batch_writer_writes_aiokafkas_bytes_on_random_records() -> None:
    """``RecordBatchWriter`` against aiokafka's ``DefaultRecordBatchBuilder`` (magic 2, no
    compression): the same bytes - header, CRC, records - on random keys, values (None, empty,
    long), headers and timestamps (before the first one too), the same sizes as they grow, and a
    full batch refused at the same record."""
    import random

    from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

    from stream.kafka._records import RecordBatchWriter

    rng = random.Random(5)
    full = 0
    for _ in range(300):
        size = rng.choice([200, 1_000, 1 << 16])
        ref, got = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, 0, size), RecordBatchWriter(size)
        for i in range(rng.randint(1, 60)):
            ts = 1_767_225_600_000 + rng.randint(-5_000, 5_000)
            key = rng.choice([None, b"", b"k" * rng.randint(1, 200)])
            value = rng.choice([None, b"", b"v" * rng.randint(1, 3_000)])
            headers = rng.choice([[], [("h", b"x")], [("\u00e9", None), ("b", b"")]])
            taken = ref.append(i, timestamp=ts, key=key, value=value, headers=headers)
            assert (taken is None) == (got.append(i, ts, key, value, headers) is None)
            if taken is None:
                full += 1
                break
            assert got.size() == ref.size()
        built = bytes(got.build())
        assert built == bytes(ref.build())
        assert DefaultRecordBatch(built).validate_crc()
    assert full > 50


def test_the_writers_append_many_is_append_of_each_while_they_fit() -> None:
    from stream.kafka._records import RecordBatchWriter

    records = [(b"k%d" % i, b"v" * 40 if i % 3 else None) for i in range(30)]
    one, many = RecordBatchWriter(700), RecordBatchWriter(700)
    n = 0
    while one.append(n, 1_767_225_600_000, *records[n], []) is not None:
        n += 1
    assert 0 < n < len(records)
    assert many.append_many(0, 1_767_225_600_000, records, 0) == n
    assert bytes(many.build()) == bytes(one.build())
    rest = RecordBatchWriter(10_000)
    assert rest.append_many(n, 1_767_225_600_000, records, n) == len(records) - n


def test_writer_of_takes_aiokafkas_plain_producer_only() -> None:
    """The writer is used for an ``AIOKafkaProducer`` without compression, idempotence or
    transactions; not for the others (fails loudly if aiokafka renames what this reads)."""
    from aiokafka import AIOKafkaProducer

    from stream.kafka.sender import writer_of

    async def producers() -> list[Any]:
        return [AIOKafkaProducer(bootstrap_servers="127.0.0.1:1"), AIOKafkaProducer(bootstrap_servers="127.0.0.1:1",
                compression_type="gzip"), AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", enable_idempotence=True)]  # fmt: skip

    plain, gzip, idempotent = asyncio.run(producers())
    make = writer_of(plain)
    assert make is not None and make().size() == 61  # a record batch's header
    assert writer_of(gzip) is None and writer_of(idempotent) is None and writer_of(Producer()) is None
