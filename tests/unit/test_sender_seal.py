"""``BatchSender.seal``: a partition's records end with one record alone in the last batch.

Tansu's ListOffsets answers the start of a partition's last record batch + 1 (BROKER.md), and a
faust changelog recovery reads to that end: records after the first of a multi-record last batch
were missed by a new owner. A sealed partition's last batch holds only the seal, so the end the
broker reports is the true one.
"""

from __future__ import annotations

from typing import Any

from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from stream.sender import BatchSender


class Producer:
    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(16384, 0)  # no compression


def records(builder: Any) -> list[tuple[bytes | None, bytes | None]]:
    batch = DefaultRecordBatch(bytes(builder._build()))  # what AIOKafkaProducer.send_batch does
    return [(r.key, r.value) for r in batch]


def test_the_seal_is_alone_in_the_partitions_last_batch_after_everything_queued_for_it() -> None:
    s = BatchSender(Producer(), lambda topic, key: 0)
    s.add("changelog", b"a", b"1", 2)
    s.add("samples", b"a", b"s")
    s.add("changelog", b"b", b"2", 2)
    s.add("changelog", b"c", None, 3)
    s.seal("changelog", 2, b"\x00seal")
    batches = s.take()
    mine = [records(b) for t, p, b in batches if (t, p) == ("changelog", 2)]
    assert mine == [[(b"a", b"1"), (b"b", b"2")], [(b"\x00seal", None)]]
    # other partitions and topics keep their records, unsealed
    assert [records(b) for t, p, b in batches if (t, p) == ("changelog", 3)] == [[(b"c", None)]]
    assert [records(b) for t, p, b in batches if t == "samples"] == [[(b"a", b"s")]]
    assert s.take() == []  # the sender starts afresh


def test_a_seal_with_nothing_queued_is_a_batch_of_one() -> None:
    s = BatchSender(Producer(), lambda topic, key: 0)
    s.seal("changelog", 1, b"\x00seal")
    assert [(t, p, records(b)) for t, p, b in s.take()] == [("changelog", 1, [(b"\x00seal", None)])]
