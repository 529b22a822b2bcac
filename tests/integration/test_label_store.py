"""Contract tests of the LabelStore, over the in-memory and the RocksDB (rocksdict) stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stream.rocksdb_store import RocksDBStore, due_key
from stream.store import InMemoryStore, LabelStore


@pytest.fixture(params=["memory", "rocksdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LabelStore]:
    if request.param == "memory":
        yield InMemoryStore()
    else:
        s = RocksDBStore(tmp_path / "db")
        yield s
        s.close()


def test_put_get_delete(store: LabelStore) -> None:
    assert store.get(b"a") is None and len(store) == 0
    store.put(b"a", b"1", 10)
    store.put(b"a", b"2", 10)
    assert store.get(b"a") == b"2" and len(store) == 1
    store.delete(b"a")
    store.delete(b"a")
    assert store.get(b"a") is None and len(store) == 0 and store.pop_due(100) == []


def test_pop_due_in_due_order_and_only_once(store: LabelStore) -> None:
    store.put(b"late", b"x", 30)
    store.put(b"early", b"x", -5)
    store.put(b"mid", b"x", 20)
    store.put(b"never", b"x", None)
    assert store.pop_due(20) == [b"early", b"mid"]
    assert store.pop_due(20) == []
    assert store.pop_due(10**15) == [b"late"]
    assert len(store) == 4  # popping the index keeps the values


def test_reschedule_moves_the_index_only(store: LabelStore) -> None:
    store.put(b"a", b"v", 10)
    store.reschedule(b"a", 50)
    assert store.pop_due(49) == [] and store.get(b"a") == b"v"
    store.reschedule(b"a", None)
    assert store.pop_due(10**15) == []
    store.reschedule(b"missing", 1)
    assert store.pop_due(10**15) == []


def test_meta(store: LabelStore) -> None:
    assert store.get_meta(b"swept") is None
    store.put_meta(b"swept", b"\x01")
    assert store.get_meta(b"swept") == b"\x01" and len(store) == 0


def test_rocksdb_survives_reopen(tmp_path: Path) -> None:
    s = RocksDBStore(tmp_path / "db")
    s.put(b"a", b"1", 7)
    s.put(b"b", b"2", 3)
    s.put_meta(b"m", b"x")
    s.close()
    s = RocksDBStore(tmp_path / "db")
    assert len(s) == 2 and s.get(b"a") == b"1" and s.get_meta(b"m") == b"x"
    assert s.pop_due(10) == [b"b", b"a"]
    s.close()


def test_due_key_sorts_by_time_including_negative() -> None:
    keys = [due_key(t, b"k") for t in (-(2**40), -1, 0, 1, 2**50)]
    assert keys == sorted(keys)
