"""``stream.kafka.lean_fetch``: aiokafka's fetched records a record batch at a time. Every test
compares with aiokafka's own ``PartitionRecords`` / ``FetchResult.getall`` on real record batches
(aiokafka's builder): the same records, field for field, and the same positions after."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import random
import struct
from typing import Any

import aiokafka
import pytest
from aiokafka.consumer import fetcher as aiofetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition

from stream.kafka import lean_fetch
from stream.kafka.lean_fetch import AIOKAFKA_VERSION, LeanPartitionRecords, LeanRecord

# sha256 of the aiokafka code lean_fetch copies or relies on (0.14.0): a change in any means
# stream/kafka/lean_fetch.py must be re-checked against it (then update the digests here)
AIOKAFKA_INTERNALS = {
    "PartitionRecords._unpack_records": "b803e6d46480732c7a7faa8e784b338bcdd4e707ea67fba96c013654b04b8a08",
    "PartitionRecords._consumer_record": "e668541600b047ab928a9008b54c00951d9ae7e2a11b82e7b00f3a5d71b0cc0c",
    "PartitionRecords.__next__": "63ac34a08c309098fe6f0a08bc2870a6535069d7671187729bb5ffabd8efe2ac",
    "FetchResult.getall": "3e717e30de5068d549dd41b231928c67a24e832a928d48bac5f485e448daa903",
    "FetchResult.check_assignment": "b5340df67e3f330f998e01e49adc7fd03dae24b8a0e201ae4325d3f980d3eae3",
    "Fetcher._proc_fetch_request": "59bf948fff47eed580671971252454daa614df479733f3bedfefe95bc4d8ad30",
}
TP = TopicPartition("events.impressions", 3)
STOCK = LeanPartitionRecords.__bases__[0]  # aiokafka's own, whether or not install() ran in this process
ATTRIBUTES_AT, CRC_AT = struct.calcsize(">qiibI"), struct.calcsize(">qiib")


def _source(name: str) -> str:
    cls, attr = name.split(".")
    if name == "FetchResult.getall":
        return inspect.getsource(lean_fetch._stock_getall)
    return inspect.getsource(getattr(STOCK if cls == "PartitionRecords" else getattr(aiofetcher, cls), attr))


def batch(base: int, deltas: list[int], *, producer_id: int = -1, transactional: bool = False, control: bool = False,
          compression: int = 0, abort: bool = True, seed: int = 0) -> bytes:  # fmt: skip
    """A record batch at ``base`` with records at ``base + delta``: keys, values and headers of all
    kinds; ``control``: a transaction marker (abort, or commit)."""
    rng = random.Random(seed)
    b = DefaultRecordBatchBuilder(2, compression, int(transactional), producer_id, 0 if producer_id >= 0 else -1,
                                  -1, 1 << 20)  # fmt: skip
    for d in deltas:
        if control:
            key, value, headers = struct.pack(">HH", 0, 0 if abort else 1), struct.pack(">HI", 0, 1), []
        else:
            key = rng.choice([None, b"", b"imp-%d" % d])
            value = rng.choice([None, b"", b'{"impression_id":"imp-%d"}' % d])
            headers = rng.choice([[], [("trace", b"x")], [("a", b""), ("b", b"yz")]])
        assert b.append(d, timestamp=1_700_000_000_000 + d, key=key, value=value, headers=headers) is not None
    buf = bytearray(b.build())
    struct.pack_into(">q", buf, 0, base)
    if control:
        attrs = struct.unpack_from(">h", buf, ATTRIBUTES_AT)[0] | 0x20
        struct.pack_into(">h", buf, ATTRIBUTES_AT, attrs)
        struct.pack_into(">I", buf, CRC_AT, calc_crc32c(bytes(buf[ATTRIBUTES_AT:])))
    return bytes(buf)


def stock(data: bytes, fetch_offset: int, **kw: Any) -> tuple[list[tuple[Any, ...]], int]:
    pr = STOCK(TP, MemoryRecords(data), kw.get("aborted", []), fetch_offset, None, None, kw.get("crc", True),
               kw.get("isolation", 0))
    return [dataclasses.astuple(r) for r in pr], pr.next_fetch_offset


def lean(data: bytes, fetch_offset: int, **kw: Any) -> tuple[list[tuple[Any, ...]], int]:
    pr = LeanPartitionRecords(TP, MemoryRecords(data), kw.get("aborted", []), fetch_offset, None, None,
                              kw.get("crc", True), kw.get("isolation", 0))  # fmt: skip
    records = pr.take_all()
    assert all(type(r) is LeanRecord for r in records)
    return [tuple(r) for r in records], pr.next_fetch_offset


def test_the_installed_aiokafka_is_the_one_lean_fetch_copies() -> None:
    assert aiokafka.__version__ == AIOKAFKA_VERSION, (
        f"aiokafka {aiokafka.__version__} installed; stream/kafka/lean_fetch.py copies {AIOKAFKA_VERSION}'s fetcher"
    )
    changed = [name for name, digest in AIOKAFKA_INTERNALS.items()
               if hashlib.sha256(_source(name).encode()).hexdigest() != digest]  # fmt: skip
    assert not changed, f"aiokafka's {changed} changed: re-check stream/kafka/lean_fetch.py against them"


def test_lean_records_have_consumer_records_fields_in_its_order() -> None:
    assert LeanRecord._fields == tuple(f.name for f in dataclasses.fields(aiokafka.structs.ConsumerRecord))


@pytest.mark.parametrize("compression", [0, 1], ids=["plain", "gzip"])
def test_take_all_is_aiokafkas_records_on_random_fetches(compression: int) -> None:
    """Batches of one to fifty records, offsets skipped within some (compaction), the fetch
    starting inside a batch (a compressed set's head is read again and skipped): the same records
    and the same next fetch offset as aiokafka's generator."""
    rng = random.Random(compression)
    records = 0
    for round_ in range(150):
        data, base = b"", rng.randint(0, 10**9)
        for k in range(rng.randint(1, 5)):
            deltas = sorted(rng.sample(range(60), rng.randint(1, 50)))
            if rng.random() < 0.5:
                deltas = list(range(len(deltas)))
            data += batch(base, deltas, compression=compression, seed=round_ * 10 + k)
            base += deltas[-1] + 1 + rng.choice([0, 0, 4])
        first = struct.unpack_from(">q", data, 0)[0]
        fetch_offset = first + rng.choice([0, 0, 1, 7])
        got, expected = lean(data, fetch_offset), stock(data, fetch_offset)
        assert got == expected
        records += len(got[0])
    assert records > 5_000


def test_control_and_aborted_transactional_batches_are_skipped_as_aiokafka_skips_them() -> None:
    """read_committed: a producer's aborted transaction is skipped up to its abort marker, a
    committed one kept, control batches never handed over; read_uncommitted keeps them all."""
    data = (
        batch(100, [0, 1, 2], producer_id=7, transactional=True, seed=1)
        + batch(103, [0], producer_id=7, transactional=True, control=True, abort=True)
        + batch(104, [0, 1], producer_id=8, transactional=True, seed=2)
        + batch(106, [0], producer_id=8, transactional=True, control=True, abort=False)
        + batch(107, [0, 1, 2, 3], seed=3)
    )
    for isolation, aborted in ((1, [(7, 100)]), (0, [])):
        got = lean(data, 100, isolation=isolation, aborted=list(aborted))
        assert got == stock(data, 100, isolation=isolation, aborted=list(aborted))
        offsets = [r[2] for r in got[0]]
        assert offsets == ([104, 105, 107, 108, 109, 110] if isolation else [100, 101, 102, 104, 105, 107, 108, 109, 110])
        assert got[1] == 111


def test_a_corrupt_batch_after_good_ones_hands_those_over_and_stays_to_be_fetched_again() -> None:
    good = batch(10, [0, 1, 2], seed=4) + batch(13, [0, 1], seed=5)
    bad = bytearray(batch(15, [0, 1, 2], seed=6))
    bad[-1] ^= 0xFF  # its CRC no longer matches
    records, position = lean(good + bytes(bad), 10)
    assert [r[2] for r in records] == [10, 11, 12, 13, 14] and position == 15  # read from 15 again next
    with pytest.raises(CorruptRecordException):
        lean(bytes(bad), 15)
    with pytest.raises(CorruptRecordException):
        stock(bytes(bad), 15)


def test_lean_records_is_its_python_twin() -> None:
    from stream.kafka import _records

    data = batch(50, [0, 1, 3, 4, 9], seed=8) + batch(60, list(range(30)), seed=9)
    for min_offset in (0, 52, 61, 100):
        for compiled, python in zip(record_batches(data), record_batches(data), strict=True):
            assert _records.lean_records(compiled, "t", 2, min_offset, LeanRecord) == lean_fetch.lean_records_py(
                python, "t", 2, min_offset, LeanRecord)  # fmt: skip


def record_batches(data: bytes) -> list[Any]:
    records, out = MemoryRecords(data), []
    while records.has_next():
        out.append(records.next_batch())
    return out


class _State:
    def __init__(self, position: int) -> None:
        self.paused, self.position = False, position

    def consumed_to(self, position: int) -> None:
        self.position = position


class _Assignment:
    active = True

    def __init__(self, position: int) -> None:
        self.state = _State(position)

    def state_value(self, tp: Any) -> _State:
        return self.state


@pytest.mark.parametrize("max_records", [None, 3])
def test_getall_takes_every_record_at_once_or_leaves_it_to_aiokafka(monkeypatch: pytest.MonkeyPatch,
                                                                     max_records: int | None) -> None:  # fmt: skip
    """Installed, ``FetchResult.getall`` gives what aiokafka's gives - all the records, or
    ``max_records`` of them through aiokafka's own generator - and moves the position alike."""
    data = batch(20, [0, 1, 2, 3], seed=10) + batch(24, [0, 1, 2], seed=11)
    monkeypatch.setattr(aiofetcher, "PartitionRecords", STOCK)  # as before any install(), and after this test
    monkeypatch.setattr(aiofetcher.FetchResult, "getall", lean_fetch._stock_getall)
    results = []
    for installed in (False, True):
        if installed:
            assert lean_fetch.install()
        assignment = _Assignment(20)
        pr = aiofetcher.PartitionRecords(TP, MemoryRecords(data), [], 20, None, None, True, 0)
        assert (type(pr) is LeanPartitionRecords) == installed
        result = aiofetcher.FetchResult(TP, assignment=assignment, partition_records=pr, backoff=0)
        taken = []
        while result.has_more():
            taken += [tuple(r) if installed else dataclasses.astuple(r) for r in result.getall(max_records)]
            taken.append(("position", assignment.state.position))
        results.append(taken)
    assert results[0] == results[1]
    assert results[0][-1] == ("position", 27)


def test_install_leaves_another_aiokafka_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean_fetch.aiokafka, "__version__", "0.15.0")
    monkeypatch.setattr(aiofetcher, "PartitionRecords", STOCK)
    monkeypatch.setattr(aiofetcher.FetchResult, "getall", lean_fetch._stock_getall)
    assert not lean_fetch.install()
    assert aiofetcher.PartitionRecords is STOCK and aiofetcher.FetchResult.getall is lean_fetch._stock_getall


def test_take_all_after_the_records_were_taken_one_at_a_time_gives_the_rest_then_nothing() -> None:
    data = batch(30, [0, 1, 2, 3], seed=12) + batch(34, [0, 1], seed=13)
    pr = LeanPartitionRecords(TP, MemoryRecords(data), [], 30, None, None, True, 0)
    assert next(pr).offset == 30  # aiokafka's own path: a record at a time
    assert [r.offset for r in pr.take_all()] == [31, 32, 33, 34, 35] and pr.next_fetch_offset == 36
    assert pr.take_all() == [] and pr.take_all() == []  # spent
