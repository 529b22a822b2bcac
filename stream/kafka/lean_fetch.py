"""aiokafka's fetched records, a record batch at a time, as tuples (the joiner's consumer).

aiokafka turns each fetched record into a ``ConsumerRecord`` dataclass of eleven fields, one
generator step at a time (``PartitionRecords._unpack_records``), and ``FetchResult.getall`` takes
them one ``next()`` at a time: 0.82 us a record on the joiner bench's records, in faust's consumer
thread, under the GIL the join needs too (the largest piece of aiokafka's share in the joiner's
profile; docs/joiner.md, round 21). ``install()`` makes aiokafka read a fetched partition's
records a batch at a time when they are all taken at once (``getall()`` with no ``max_records``,
which is how faust's consumer asks): ``LeanRecord``s - the same fields, in the same order, read by
the same names - built by one compiled call per record batch (``stream/kafka/_records.c``;
``lean_records_py`` is its Python twin). Everything else is aiokafka's: the record batches'
decoding, CRC checks, control and aborted transactional batches (the same branches as its
generator, in the same order), positions; a fetch taken a record at a time (``getone``,
``max_records``) goes through aiokafka's own generator, whose records are then ``LeanRecord``s too.

It relies on aiokafka internals (``PartitionRecords``, ``FetchResult.getall``): ``install()`` does
nothing but log on any other aiokafka than ``AIOKAFKA_VERSION`` (the one constraints.txt pins), and
``tests/unit/test_lean_fetch.py`` fails when the installed one differs or when its code this copies
changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import aiokafka
from aiokafka.consumer import fetcher as _fetcher

log = logging.getLogger(__name__)
AIOKAFKA_VERSION = "0.14.0"  # the aiokafka whose PartitionRecords / FetchResult.getall this copies

try:
    from stream.kafka import _records
except ImportError:  # pragma: no cover - built by every install here (setup.py); the Python twin otherwise
    _records = None  # type: ignore[assignment]


class LeanRecord(NamedTuple):
    """A fetched record: aiokafka's ``ConsumerRecord`` fields, in its order, as a tuple."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    checksum: int | None
    serialized_key_size: int
    serialized_value_size: int
    headers: tuple[tuple[str, bytes], ...]


_new = tuple.__new__


def _lean(topic: str, partition: int, r: Any, cls: type = LeanRecord) -> Any:
    """aiokafka's batch record ``r`` as ``cls``, the fields aiokafka's ``_consumer_record`` gives it."""
    k, v = r.key, r.value
    return _new(cls, (topic, partition, r.offset, r.timestamp, r.timestamp_type, k, v, r.checksum,
                      -1 if k is None else len(k), -1 if v is None else len(v), tuple(r.headers)))  # fmt: skip


def lean_records_py(batch: Iterable[Any], topic: str, partition: int, min_offset: int, cls: type = LeanRecord) -> list[Any]:
    """The records of ``batch`` (aiokafka's record batch) from ``min_offset`` on, as ``cls``
    (``_records.lean_records``, in Python)."""
    return [_lean(topic, partition, r, cls) for r in batch if r.offset >= min_offset]


lean_records: Callable[[Iterable[Any], str, int, int, type], list[Any]] = (
    _records.lean_records if _records is not None else lean_records_py
)


class LeanPartitionRecords(_fetcher.PartitionRecords):
    """aiokafka's ``PartitionRecords`` whose records are ``LeanRecord``s, and which hands all of them
    over at once (``take_all``) while none has been taken one at a time."""

    _stepped = False  # a record was taken through the generator (aiokafka's own path)

    def __next__(self) -> Any:
        self._stepped = True
        return super().__next__()

    def _consumer_record(self, tp: Any, record: Any) -> Any:  # aiokafka's generator path
        if self._key_deserializer or self._value_deserializer:
            return super()._consumer_record(tp, record)
        return _lean(tp.topic, tp.partition, record)

    def take_all(self) -> list[Any]:
        """Every record left, as ``list(self)`` gives them and with the same ``next_fetch_offset``
        after, a record batch at a time. A batch that fails to decode (a CRC) raises at once when
        no record came before it; otherwise the records before it are handed over and the position
        stays at its start, so the next fetch reads it again (aiokafka's generator would have
        dropped them with the error)."""
        if getattr(self, "_records_iterator", None) is None:  # aiokafka's generator, run to its end
            return []
        if self._stepped or self._key_deserializer or self._value_deserializer:
            return list(self)
        self._records_iterator = None  # never started: nothing of it to finish
        tp = self._tp
        topic, partition = tp.topic, tp.partition
        records = self._records
        out: list[Any] = []
        while records.has_next():
            try:
                next_batch = records.next_batch()
                if self._check_crcs and not next_batch.validate_crc():
                    raise _fetcher.Errors.CorruptRecordException(f"Invalid CRC - {tp}")
                if self._isolation_level == _fetcher.READ_COMMITTED and next_batch.producer_id is not None:
                    self._consume_aborted_up_to(next_batch.base_offset)
                    if next_batch.is_control_batch and self._contains_abort_marker(next_batch):
                        self._aborted_producers.discard(next_batch.producer_id)
                    if next_batch.is_transactional and next_batch.producer_id in self._aborted_producers:
                        self.next_fetch_offset = next_batch.next_offset
                        continue
                if next_batch.is_control_batch:
                    self.next_fetch_offset = next_batch.next_offset
                    continue
                out += lean_records(next_batch, topic, partition, self.next_fetch_offset, LeanRecord)
            except Exception:
                # spent, as aiokafka's generator is once it raised: what is left of this fetch is read
                # again from the position (this batch's start) by the next one
                self._stepped, self._records_iterator = True, iter(())
                if not out:
                    raise
                log.warning("%s: a record batch failed to decode after %d records; they are handed over and "
                            "the batch is fetched again", tp, len(out), exc_info=True)  # fmt: skip
                return out
            self.next_fetch_offset = next_batch.next_offset
        return out


_stock_getall = _fetcher.FetchResult.getall


def _getall(self: Any, max_records: int | None = None) -> list[Any]:
    """``FetchResult.getall``: every record at once through ``LeanPartitionRecords.take_all`` when
    no ``max_records`` bounds it, else aiokafka's own."""
    records = self._partition_records
    if max_records is not None or type(records) is not LeanPartitionRecords:
        return _stock_getall(self, max_records)
    if not self.check_assignment(self._topic_partition) or not self.has_more():
        return []
    out = records.take_all()
    self._update_position()
    self._partition_records = None
    return out


def install() -> bool:
    """Make aiokafka's fetcher, in this process, build ``LeanRecord``s a record batch at a time (see
    the module doc); True when it does (once installed, again is a no-op)."""
    if aiokafka.__version__ != AIOKAFKA_VERSION:
        log.warning("aiokafka %s is not %s, whose fetcher stream/kafka/lean_fetch.py was written against: "
                    "records are read aiokafka's own way", aiokafka.__version__, AIOKAFKA_VERSION)  # fmt: skip
        return False
    _fetcher.PartitionRecords = LeanPartitionRecords
    _fetcher.FetchResult.getall = _getall
    return True
