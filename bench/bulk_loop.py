"""The joiner's fetch-loop and sender costs in process, no broker: ``python -m bench.bulk_loop [--json F]``.

- ``bulk_loop_us_per_record``: ``stream.kafka.faust_bulk``'s fetch loop (over faust's real
  consumer class and scheduler, with stand-ins for what it awaits) handing fetches shaped like the
  joiner bench's - five topics over four partitions, 400 impressions to 2 activations per
  partition and fetch, as ``LeanRecord``s - to a handler that keeps nothing;
  ``one_record_loop_us_per_record``: the same with every fetch taken by its one-record loop (what
  a fetch with a gap takes; all of them before round 21);
- ``unpack_us_per_record`` / ``aiokafka_unpack_us_per_record``: a fetched partition's records
  (100 record batches of 100 records like the bench's impressions, CRCs checked) read by
  ``stream.kafka.lean_fetch`` and by aiokafka's own ``PartitionRecords``;
- ``sender_us_per_record``: ``BatchSender`` filling record batches with a batch's outputs
  (``add_all``, keyed samples) and a flush's changelog records (``add_to``), built as the producer
  sends them: ``RecordBatchWriter``s (the joiner's), and ``aiokafka_builder_sender_us_per_record``
  aiokafka's own builders.

Each is the best of five passes (CPU time). docs/joiner.md, rounds 19 and 21.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.report import write_json

TOPICS = ("impressions", "clicks", "applications", "approvals", "activations")
PER_FETCH = {"impressions": 400, "clicks": 40, "applications": 8, "approvals": 4, "activations": 2}
PARTITIONS = 4


def _fetches(n: int) -> list[dict[Any, list[Any]]]:
    from faust.types import TP

    from stream.kafka.lean_fetch import LeanRecord

    pos: dict[Any, int] = defaultdict(int)
    out = []
    for _ in range(n):
        fetch = {}
        for topic in TOPICS:
            for p in range(PARTITIONS):
                tp = TP(topic, p)
                first = pos[tp]
                fetch[tp] = [LeanRecord(topic, p, first + i, 0, 0, b"k%d" % i, b"v" * 200, None, 3, 200, ())
                             for i in range(PER_FETCH[topic])]  # fmt: skip
                pos[tp] = first + PER_FETCH[topic]
        out.append(fetch)
    return out


def bulk_loop_us(fetches: int = 60, passes: int = 5, one_record: bool = False) -> float:
    """Best CPU microseconds per record of the bulk fetch loop over ``fetches`` fetches
    (``one_record``: every fetch through its one-record loop)."""
    from faust.transport.utils import DefaultSchedulingStrategy

    from stream.kafka.faust_bulk import bulk_consumer

    class App:
        consumer_generation_id, rebalancing, monitor, should_stop = 1, False, None, False

        class flow_control:  # faust's attribute names
            @staticmethod
            def is_active() -> bool:
                return True

        class topics:
            @staticmethod
            def acks_enabled_for(topic: str) -> bool:
                return True

    class Diag:
        def set_flag(self, flag: str) -> None:
            pass

        def unset_flag(self, flag: str) -> None:
            pass

    class Consumer:
        """What the bulk loop reads of faust's consumer; ``fetches`` are what its fetcher returns."""

        consumer_stopped_errors = (RuntimeError,)

        def __init__(self, batches: list[dict[Any, list[Any]]]) -> None:
            self.app, self.diag, self.scheduler = App(), Diag(), DefaultSchedulingStrategy()  # type: ignore[abstract]
            self._read_offset: dict[Any, int | None] = defaultdict(lambda: None)
            self._stopped = asyncio.Event()
            self.callback, self.flow_active, self.should_stop = None, True, False
            self._buffered_partitions: set[Any] = set()
            self._commit_every, self._n_acked = None, 0
            self._left = iter(batches)

        async def _wait_next_records(self, timeout: float) -> tuple[dict[Any, list[Any]], None]:
            fetch = next(self._left, None)
            if fetch is None:
                self._stopped.set()
                return {}, None
            return fetch, None

        def _to_message(self, tp: Any, record: Any) -> Any:
            raise AssertionError("only the bulk topics are fetched here")

        async def _add_gap(self, tp: Any, start: int, end: int) -> None:
            raise AssertionError("no gaps here")

        def highwater(self, tp: Any) -> int:
            return 10**9

        async def perform_seek(self) -> None:
            pass

        def ack(self, message: Any) -> bool:
            return True

        async def commit(self) -> bool:
            return True

    handled = [0]

    def handle(batch: list[Any], spans: list[Any]) -> bool:
        handled[0] += len(batch)
        return False

    async def flush() -> None:
        return None

    cls: Any = bulk_consumer(Consumer, TOPICS, handle, flush)
    if one_record:
        cls._whole_fetch = lambda self, records, active: None
    best = float("inf")
    for _ in range(passes):
        consumer = cls(_fetches(fetches))
        handled[0] = 0
        t = time.process_time()
        asyncio.run(consumer._drain_messages(consumer))
        best = min(best, (time.process_time() - t) * 1e6 / handled[0])
    return best


def unpack_us(batches: int = 100, passes: int = 5, lean: bool = True) -> float:
    """Best CPU microseconds per record of reading a fetched partition's records: ``batches``
    record batches of 100 impressions each (keys, ~400-byte values, no headers), CRCs checked, as
    faust's consumer asks (``getall()``: all at once) - ``lean_fetch``'s ``take_all``, or aiokafka's
    own ``PartitionRecords``."""
    import json
    import struct

    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    from aiokafka.record.memory_records import MemoryRecords
    from aiokafka.structs import TopicPartition

    from stream.kafka.lean_fetch import LeanPartitionRecords

    data = bytearray()
    for b in range(batches):
        builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
        for i in range(100):
            iid = f"imp-{b * 100 + i:08d}"
            value = json.dumps({"impression_id": iid, "event_time_ms": 1_700_000_000_000,
                                "features": {f"f{k}": f"v{k}" for k in range(20)}}).encode()  # fmt: skip
            builder.append(i, timestamp=1_700_000_000_000 + i, key=iid.encode(), value=value, headers=[])
        built = builder.build()
        struct.pack_into(">q", built, 0, b * 100)
        data += built
    raw, tp = bytes(data), TopicPartition("impressions", 0)
    stock = LeanPartitionRecords.__bases__[0]  # aiokafka's own
    best = float("inf")
    for _ in range(passes):
        t = time.process_time()
        if lean:
            n = len(LeanPartitionRecords(tp, MemoryRecords(raw), [], 0, None, None, True, 0).take_all())
        else:
            n = len(list(stock(tp, MemoryRecords(raw), [], 0, None, None, True, 0)))
        best = min(best, (time.process_time() - t) * 1e6 / n)
    return best


def sender_us(records: int = 20_000, passes: int = 5, writer: bool = True) -> float:
    """Best CPU microseconds per record of ``BatchSender`` over ``records`` samples (``add_all``, four
    partitions by key) and as many changelog records (``add_to``, one partition), each batch then
    built as the producer builds it to send it (``_build``: its CRC); ``writer``: in
    ``RecordBatchWriter``s (as the joiner's producer), else in aiokafka's own builders."""
    from types import SimpleNamespace

    from aiokafka.producer.message_accumulator import BatchBuilder

    from stream.kafka.partitioner import key_partition
    from stream.kafka.sender import BatchSender

    class Producer:
        def __init__(self) -> None:
            if writer:  # what ``writer_of`` reads of an AIOKafkaProducer
                self._message_accumulator = SimpleNamespace(_batch_size=1 << 20, _compression_type=0, _txn_manager=None)

        def create_batch(self) -> BatchBuilder:
            return BatchBuilder(1 << 20, 0)

    partitions = list(range(4))
    samples = [("samples", b"s7-d1-%06d" % i, b"x" * 300) for i in range(records)]
    states = [(b"s7-d1-%06d" % i, b"y" * 389) for i in range(records)]
    best = float("inf")
    for _ in range(passes):
        sender = BatchSender(Producer(), lambda _t, k: key_partition(k, partitions))
        t = time.process_time()
        sender.add_all(samples)
        sender.add_to("changelog", 0, states)
        for _, _, batch in sender.take():
            batch._build()
        best = min(best, (time.process_time() - t) * 1e6 / (2 * records))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bulk_loop", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    report = {
        "bulk_loop_us_per_record": round(bulk_loop_us(), 3),
        "one_record_loop_us_per_record": round(bulk_loop_us(one_record=True), 3),
        "unpack_us_per_record": round(unpack_us(), 3),
        "aiokafka_unpack_us_per_record": round(unpack_us(lean=False), 3),
        "sender_us_per_record": round(sender_us(), 3),
        "aiokafka_builder_sender_us_per_record": round(sender_us(writer=False), 3),
    }
    print(report)
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
