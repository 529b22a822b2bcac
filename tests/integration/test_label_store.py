"""Contract tests of the LabelStore, over every store: in-memory, RocksDB (rocksdict), and the
joiner's ``FaustTableStore`` (on a rocksdict database like the one faust gives each table
partition), read before and after its writes are settled into RocksDB."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from rocksdict import Options, Rdict

from stream.join.app import FaustTableStore
from stream.join.rocksdb_store import RocksDBStore, due_key
from stream.join.store import InMemoryStore, LabelStore


def on(lane: int, due: int) -> tuple[int | None, ...]:
    return tuple(due if k == lane else None for k in range(5))


class FakeTable:
    """What ``FaustTableStore`` reads of a faust ``Table``: the rocksdict of a partition."""

    def __init__(self, db: Rdict) -> None:
        self.data = SimpleNamespace(_db_for_partition=lambda partition: db)


def open_rdict(path: Path) -> Rdict:
    o = Options(raw_mode=True)
    o.create_if_missing(True)
    return Rdict(str(path), options=o)


def due_in_value(value: bytes, swept: object) -> tuple[int | None, ...]:
    """Test values ``b"due:<lane>:<ms>"`` carry their own due time (the joiner decodes the state)."""
    if not value.startswith(b"due:"):
        return (None,) * 5
    lane, ms = value[4:].split(b":")
    return on(int(lane), int(ms))


class SettlingFaustStore(FaustTableStore):
    """A ``FaustTableStore`` whose writes are sent and settled into RocksDB at once (the agent's
    flush after every call), so that every read afterwards comes from RocksDB."""

    def put(self, key: bytes, value: bytes, dues: object) -> None:
        super().put(key, value, dues)  # type: ignore[arg-type]
        self.settle(self.drain())

    def delete(self, key: bytes) -> None:
        super().delete(key)
        self.settle(self.drain())


@pytest.fixture(params=["memory", "rocksdb", "faust", "faust-settled"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LabelStore]:
    if request.param == "memory":
        yield InMemoryStore()
    elif request.param == "rocksdb":
        s = RocksDBStore(tmp_path / "db")
        yield s
        s.close()
    else:
        db = open_rdict(tmp_path / "faust")
        cls = SettlingFaustStore if request.param == "faust-settled" else FaustTableStore
        yield cls(FakeTable(db), 0, due_in_value)  # type: ignore[arg-type]
        db.close()


def test_put_get_delete(store: LabelStore) -> None:
    assert store.get(b"a") is None and len(store) == 0
    store.put(b"a", b"1", on(0, 10))  # type: ignore[arg-type]
    store.put(b"a", b"2", on(0, 10))  # type: ignore[arg-type]
    assert store.get(b"a") == b"2" and len(store) == 1
    store.delete(b"a")
    store.delete(b"a")
    assert store.get(b"a") is None and len(store) == 0 and store.pop_due(0, 100) == []


def test_get_many_is_get_of_each_key_in_order(store: LabelStore) -> None:
    store.put(b"a", b"1", on(0, 10))  # type: ignore[arg-type]
    store.put(b"c", b"3", None)
    store.put(b"d", b"4", None)
    store.delete(b"d")
    keys = [b"c", b"x", b"a", b"d", b"a"]
    assert store.get_many(keys) == [store.get(k) for k in keys] == [b"3", None, b"1", None, b"1"]
    assert store.get_many([]) == []


def test_put_many_is_put_of_each_in_order(store: LabelStore) -> None:
    """The join's compiled path hands a batch's state writes over at once: the same states, the
    same schedule and count as one ``put`` each, in order (a key written twice keeps its last)."""
    store.put(b"b", b"0", on(1, 5))  # type: ignore[arg-type]
    store.put_many([(b"a", b"1", on(0, 10)), (b"b", b"2", on(0, 20)), (b"c", b"3", None),
                    (b"a", b"4", on(2, 30))])  # type: ignore[list-item]  # fmt: skip
    store.put_many([])
    assert store.get_many([b"a", b"b", b"c"]) == [b"4", b"2", b"3"] and len(store) == 3
    assert store.pop_due(1, 100) == []  # b's lane-1 due went with its new dues
    assert store.pop_due(0, 100) == [b"b"] and store.pop_due(2, 100) == [b"a"]


def test_faust_store_get_many_reads_unsent_then_unsettled_then_settled_writes(tmp_path: Path) -> None:
    db = open_rdict(tmp_path / "faust")
    s = FaustTableStore(FakeTable(db), 0, due_in_value)  # type: ignore[arg-type]
    s.put(b"settled", b"s", None)
    s.put(b"gone", b"g", None)
    s.settle(s.drain())
    s.put(b"sending", b"1", None)
    s.delete(b"gone")
    s.drain()  # not yet acknowledged: being sent
    s.put(b"sending", b"2", None)  # newer than the one being sent
    s.put(b"unsent", b"u", None)
    keys = [b"settled", b"gone", b"sending", b"unsent", b"nothing"]
    assert s.get_many(keys) == [s.get(k) for k in keys] == [b"s", None, b"2", b"u", None]
    db.close()


class CountingDb:
    """A rocksdict that records the keys each multi-get asks for."""

    def __init__(self, db: Rdict) -> None:
        self.db = db
        self.asked: list[list[bytes]] = []

    def get(self, key: object) -> object:
        if isinstance(key, list):
            self.asked.append(list(key))
        return self.db.get(key)

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.db[key] = value


def test_faust_store_get_many_asks_rocksdb_only_for_the_states_it_holds(tmp_path: Path) -> None:
    db = open_rdict(tmp_path / "faust")
    s = FaustTableStore(FakeTable(db), 0, due_in_value)  # type: ignore[arg-type]
    s.put(b"old", b"o", None)
    s.put(b"gone", b"g", None)
    s.settle(s.drain())
    counting = CountingDb(db)
    s = FaustTableStore(FakeTable(counting), 0, due_in_value)  # type: ignore[arg-type]  # a restart: held, from RocksDB
    s.delete(b"gone")
    s.put(b"fresh", b"f", None)
    keys = [b"new-1", b"old", b"gone", b"fresh", b"new-2"]
    assert s.get_many(keys) == [None, b"o", None, b"f", None]
    assert counting.asked == [[b"old"]]  # new impressions' keys and pending writes: not asked
    s.settle(s.drain())
    assert s.get_many(keys) == [None, b"o", None, b"f", None]
    assert counting.asked[1:] == [[b"old"]]  # "fresh" was settled by the last flush: read from memory
    db.close()


def test_faust_store_reads_the_states_of_its_last_settled_flushes_as_rocksdb_holds_them(tmp_path: Path) -> None:
    """A sweep reads the states whose dues came, many written a flush or two before (a backlog
    read races through event time): those the last ``SETTLED_KEPT`` flushes settled are read from
    what they wrote - the values RocksDB holds, deletes included - and only older ones from RocksDB."""
    from stream.join.faust_store import SETTLED_KEPT

    db = open_rdict(tmp_path / "faust")
    counting = CountingDb(db)
    s = FaustTableStore(FakeTable(counting), 0, due_in_value)  # type: ignore[arg-type]
    flushes: list[list[tuple[bytes, bytes | None]]] = [
        [(b"a", b"a1"), (b"b", b"b1"), (b"e", b"e1")],
        [(b"a", b"a2")],
        [(b"c", b"c1"), (b"b", None)],
        [(b"d", b"d1"), (b"e", b"e2")],
    ]
    assert SETTLED_KEPT == 2  # the last two flushes below are kept, the first two are not
    for writes in flushes:
        for key, value in writes:
            if value is None:
                s.delete(key)
            else:
                s.put(key, value, None)
        s.settle(s.drain())
    keys = [b"a", b"b", b"c", b"d", b"e", b"x"]
    want = [b"a2", None, b"c1", b"d1", b"e2", None]
    assert [db.get(k) for k in keys] == want  # what RocksDB holds
    assert s.get_many(keys) == want
    assert [s.get(k) for k in keys] == want
    asked = [k for call in counting.asked for k in call]
    assert asked == [b"a"]  # written by a flush no longer kept: the one key the multi-get asks RocksDB for
    db.close()


def test_pop_due_in_due_order_and_only_once(store: LabelStore) -> None:
    store.put(b"late", b"x", on(1, 30))  # type: ignore[arg-type]
    store.put(b"early", b"x", on(1, -5))  # type: ignore[arg-type]
    store.put(b"mid", b"x", on(1, 20))  # type: ignore[arg-type]
    store.put(b"never", b"x", None)
    assert store.pop_due(1, 20) == [b"early", b"mid"]
    assert store.pop_due(1, 20) == []
    assert store.pop_due(0, 10**15) == []  # another lane
    assert store.pop_due(1, 10**15) == [b"late"]
    assert len(store) == 4  # popping the index keeps the values


def test_lanes_are_independent(store: LabelStore) -> None:
    store.put(b"a", b"v", (10, None, 50, None, None))
    assert store.pop_due(2, 49) == [] and store.pop_due(0, 10) == [b"a"]
    assert store.pop_due(0, 10**15) == []  # popped from lane 0 only
    assert store.pop_due(2, 50) == [b"a"]
    store.put(b"a", b"v", (10, None, 50, None, None))  # scheduled again after the pops: due again
    assert store.pop_due(0, 10) == [b"a"] and store.pop_due(2, 50) == [b"a"]


def test_reschedule_moves_the_index_only(store: LabelStore) -> None:
    store.put(b"a", b"v", on(3, 10))  # type: ignore[arg-type]
    store.reschedule(b"a", on(3, 50))  # type: ignore[arg-type]
    assert store.pop_due(3, 49) == [] and store.get(b"a") == b"v"
    store.reschedule(b"a", (None, 60, None, None, None))
    assert store.pop_due(3, 10**15) == [] and store.pop_due(1, 60) == [b"a"]
    store.reschedule(b"a", None)
    assert all(store.pop_due(lane, 10**15) == [] for lane in range(5))
    store.reschedule(b"missing", on(0, 1))  # type: ignore[arg-type]
    assert store.pop_due(0, 10**15) == []


def test_meta(store: LabelStore) -> None:
    assert store.get_meta(b"swept") is None
    store.put_meta(b"swept", b"\x01")
    assert store.get_meta(b"swept") == b"\x01" and len(store) == 0


def test_rocksdb_survives_reopen(tmp_path: Path) -> None:
    s = RocksDBStore(tmp_path / "db")
    s.put(b"a", b"1", on(4, 7))  # type: ignore[arg-type]
    s.put(b"b", b"2", (3, None, None, None, 9))
    s.put_meta(b"m", b"x")
    s.close()
    s = RocksDBStore(tmp_path / "db")
    assert len(s) == 2 and s.get(b"a") == b"1" and s.get_meta(b"m") == b"x"
    assert s.pop_due(4, 10) == [b"a", b"b"] and s.pop_due(0, 10) == [b"b"]
    s.close()


def test_rocksdb_store_of_the_single_lane_layout_is_converted(tmp_path: Path) -> None:
    """A store written before the lanes (``d`` + key -> due, ``x`` + due + key): each key is
    put on every lane at its old due time, so nothing due is missed after an upgrade."""
    from rocksdict import Options, Rdict

    bias, u64 = 2**63, struct.Struct(">Q")
    o = Options(raw_mode=True)
    o.create_if_missing(True)
    db = Rdict(str(tmp_path / "old"), options=o)
    for key, due in ((b"a", 30), (b"b", -5)):
        db[b"s" + key] = b"state-" + key
        db[b"d" + key] = u64.pack(due + bias)
        db[b"x" + u64.pack(due + bias) + key] = b""
    db[b"mswept"] = struct.pack(">q", 12)
    db.close()
    s = RocksDBStore(tmp_path / "old")
    assert len(s) == 2 and s.get(b"a") == b"state-a" and s.get_meta(b"swept") == struct.pack(">q", 12)
    for lane in range(5):
        assert s.pop_due(lane, 30) == [b"b", b"a"]
    s.put(b"a", b"new", on(2, 40))  # type: ignore[arg-type]
    assert s.pop_due(2, 40) == [b"a"] and s.pop_due(0, 10**15) == []
    s.close()


def test_due_key_sorts_by_lane_then_time_including_negative() -> None:
    keys = [due_key(lane, t, b"k") for lane in (0, 1) for t in (-(2**40), -1, 0, 1, 2**50)]
    assert keys == sorted(keys)


def test_faust_store_reads_unsent_then_unsettled_then_settled_writes(tmp_path: Path) -> None:
    db = open_rdict(tmp_path / "faust")
    s = FaustTableStore(FakeTable(db), 0, due_in_value)  # type: ignore[arg-type]
    s.put(b"a", b"1", on(0, 5))  # type: ignore[arg-type]
    s.put(b"a", b"2", on(0, 5))  # type: ignore[arg-type]
    s.put(b"b", b"x", on(0, 6))  # type: ignore[arg-type]
    s.delete(b"b")
    sent = s.drain()
    assert sent == {b"a": b"2", b"b": None}  # the last write of each key (a compacted changelog)
    assert s.drain() == {} and s.outbox == {}
    assert db.get(b"a") is None and s.get(b"a") == b"2"  # readable while being sent
    s.put(b"a", b"3", on(0, 5))  # type: ignore[arg-type]
    assert s.get(b"a") == b"3"  # the newest write wins over the one being sent
    s.settle(sent)
    assert db[b"a"] == b"2" and db.get(b"b") is None and s.sending == []
    assert s.get(b"a") == b"3"
    s.settle(s.drain())
    assert db[b"a"] == b"3"
    db.close()


def test_faust_store_reads_the_newest_of_two_drains_in_flight(tmp_path: Path) -> None:
    """Two flushes may be in flight: a read finds the newest write - unsent, then the later drain,
    then the earlier one, then RocksDB - and each drain settles in turn."""
    db = open_rdict(tmp_path / "faust")
    s = FaustTableStore(FakeTable(db), 0, due_in_value)  # type: ignore[arg-type]
    s.put(b"a", b"1", on(0, 5))  # type: ignore[arg-type]
    s.put(b"b", b"1", on(0, 5))  # type: ignore[arg-type]
    s.put(b"c", b"1", on(0, 5))  # type: ignore[arg-type]
    first = s.drain()
    s.put(b"a", b"2", on(0, 5))  # type: ignore[arg-type]
    s.delete(b"b")
    second = s.drain()
    s.put(b"a", b"3", on(0, 5))  # type: ignore[arg-type]
    assert s.sending == [first, second]
    assert s.get_many([b"a", b"b", b"c", b"d"]) == [b"3", None, b"1", None]
    assert [s.get(k) for k in (b"a", b"b", b"c", b"d")] == [b"3", None, b"1", None]
    s.settle(first)
    assert s.sending == [second] and db[b"b"] == b"1"
    assert s.get_many([b"a", b"b", b"c"]) == [b"3", None, b"1"]  # the second drain's delete still wins
    s.settle(second)
    assert s.sending == [] and db.get(b"b") is None and db[b"a"] == b"2"
    assert s.get_many([b"a", b"b", b"c"]) == [b"3", None, b"1"]
    db.close()


def test_faust_store_rebuilds_its_due_index_from_rocksdb_on_creation(tmp_path: Path) -> None:
    db = open_rdict(tmp_path / "faust")
    s = FaustTableStore(FakeTable(db), 0, due_in_value)  # type: ignore[arg-type]
    s.put(b"a", b"due:2:40", on(2, 40))  # type: ignore[arg-type]
    s.put(b"b", b"due:2:30", on(2, 30))  # type: ignore[arg-type]
    s.put(b"c", b"due:1:10", on(1, 10))  # type: ignore[arg-type]
    s.put_meta(b"m", b"\x07")
    s.settle(s.drain())
    s.put_meta(b"other", b"y")  # metadata goes straight into RocksDB as well (written once its outputs are out)
    assert db[b"\x00other"] == b"y" and s.outbox == {b"\x00other": b"y"}  # ... and to the changelog
    s = FaustTableStore(FakeTable(db), 0, due_in_value)  # type: ignore[arg-type]  # a restart
    assert len(s) == 3 and s.get_meta(b"m") == b"\x07" and s.get_meta(b"other") == b"y"
    assert s.pop_due(2, 40) == [b"b", b"a"] and s.pop_due(1, 10) == [b"c"]
    assert len(s) == 3  # still held after their dues were popped
    db.close()
