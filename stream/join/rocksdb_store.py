"""A ``LabelStore`` in RocksDB (rocksdict) with the expiry index stored beside the states.

Key layout (one DB per partition)::

    b"s" + key                              -> state bytes
    b"e" + key                              -> the key's due time on each of the 5 lanes (5 x 8
                                               bytes big-endian; NO_DUE: not scheduled there)
    b"y" + lane (1 byte) + due (8 BE) + key -> b""   the expiry index, per lane, by due event time
    b"m" + name                             -> metadata (e.g. the swept watermarks)

Due times are offset by 2**63 so negative values sort correctly. Every update is one
``WriteBatch``, so a crash never leaves the index and the states out of step. A store written
before the lanes (``b"d" + key`` -> one due time, ``b"x" + due + key``) is converted when opened:
each key is put on every lane at its old due time (early, never late: the sweep then finds its
real dues).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from rocksdict import Options, Rdict, WriteBatch

from stream.join.funnel import LANES, NO_DUES, Dues

_BIAS: Final = 2**63
_U64 = struct.Struct(">Q")
_DUES = struct.Struct(">5Q")
_NO_DUE: Final = 0  # biased value meaning "not scheduled on this lane" (-2**63 is never a due time)


def due_key(lane: int, due_ms: int, key: bytes) -> bytes:
    """Index key that sorts by lane, due time, then key."""
    return b"y" + bytes((lane,)) + _U64.pack(due_ms + _BIAS) + key


def _pack(dues: Dues) -> bytes:
    return _DUES.pack(*(_NO_DUE if d is None else d + _BIAS for d in dues))


def _unpack(raw: bytes) -> list[int | None]:
    return [None if d == _NO_DUE else d - _BIAS for d in _DUES.unpack(raw)]


@dataclass(frozen=True)
class RocksDBOptions:
    """RocksDB tuning in one place; defaults suit a few hundred thousand small states."""

    write_buffer_size: int = 64 * 1024 * 1024
    max_open_files: int = 256
    sync_writes: bool = False  # the changelog, not fsync, is what survives a lost disk


class RocksDBStore:
    """The rocksdict implementation of ``LabelStore`` for one partition's directory."""

    def __init__(self, path: Path | str, options: RocksDBOptions | None = None) -> None:
        opts = options or RocksDBOptions()
        o = Options(raw_mode=True)
        o.create_if_missing(True)
        o.set_write_buffer_size(opts.write_buffer_size)
        o.set_max_open_files(opts.max_open_files)
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(self.path), options=o)
        self._convert_single_lane_index()
        self._count = self._scan_count()

    def _scan(self, prefix: bytes) -> list[bytes]:
        out = []
        for item in self._db.keys(from_key=prefix):
            k = bytes(item)  # type: ignore[arg-type]  # raw mode: keys are bytes
            if not k.startswith(prefix):
                break
            out.append(k)
        return out

    def _scan_count(self) -> int:
        return len(self._scan(b"s"))

    def _convert_single_lane_index(self) -> None:
        """Index entries of a store written before the lanes: every lane at the old due time."""
        old = self._scan(b"d")
        if not old:
            return
        wb = WriteBatch(raw_mode=True)
        for dk in old:
            key = dk[1:]
            raw = self._db.get(dk)
            wb.delete(dk)
            if raw is None:
                continue
            due = _U64.unpack(bytes(raw))[0]
            wb.delete(b"x" + _U64.pack(due) + key)
            if self._db.get(b"s" + key) is not None:
                dues = (due - _BIAS,) * LANES
                wb.put(b"e" + key, _pack(dues))
                for lane in range(LANES):
                    wb.put(due_key(lane, due - _BIAS, key), b"")
        for xk in self._scan(b"x"):
            wb.delete(xk)
        self._db.write(wb)

    def get(self, key: bytes) -> bytes | None:
        v = self._db.get(b"s" + key)
        return None if v is None else bytes(v)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        values = cast("list[bytes | None]", self._db.get([b"s" + k for k in keys]))  # a list for a list of keys
        return [None if v is None else bytes(v) for v in values]

    def _schedule(self, wb: WriteBatch, key: bytes, dues: Dues | None) -> None:
        raw = self._db.get(b"e" + key)
        old: list[int | None] = _unpack(bytes(raw)) if raw is not None else [None] * LANES
        new = list(dues) if dues is not None else [None] * LANES
        if old == new:
            return
        for lane in range(LANES):
            if old[lane] != new[lane]:
                if old[lane] is not None:
                    wb.delete(due_key(lane, old[lane], key))  # type: ignore[arg-type]
                if new[lane] is not None:
                    wb.put(due_key(lane, new[lane], key), b"")  # type: ignore[arg-type]
        if dues is None or tuple(dues) == NO_DUES:
            if raw is not None:
                wb.delete(b"e" + key)
        else:
            wb.put(b"e" + key, _pack(dues))

    def put(self, key: bytes, value: bytes, dues: Dues | None) -> None:
        wb = WriteBatch(raw_mode=True)
        if self._db.get(b"s" + key) is None:
            self._count += 1
        wb.put(b"s" + key, value)
        self._schedule(wb, key, dues)
        self._db.write(wb)

    def put_many(self, items: Iterable[tuple[bytes, bytes, Dues | None]]) -> None:
        for key, value, dues in items:  # each its own write batch: a later one reads what it wrote
            self.put(key, value, dues)

    def reschedule(self, key: bytes, dues: Dues | None) -> None:
        if self._db.get(b"s" + key) is None:
            return
        wb = WriteBatch(raw_mode=True)
        self._schedule(wb, key, dues)
        self._db.write(wb)

    def delete(self, key: bytes) -> None:
        if self._db.get(b"s" + key) is None:
            return
        wb = WriteBatch(raw_mode=True)
        wb.delete(b"s" + key)
        self._schedule(wb, key, None)
        self._db.write(wb)
        self._count -= 1

    def pop_due(self, lane: int, until_ms: int) -> list[bytes]:
        prefix = b"y" + bytes((lane,))
        end = prefix + _U64.pack(until_ms + _BIAS) + b"\xff" * 8
        keys: list[bytes] = []
        wb = WriteBatch(raw_mode=True)
        for item in self._db.keys(from_key=prefix):
            ik = bytes(item)  # type: ignore[arg-type]  # raw mode: keys are bytes
            if not ik.startswith(prefix) or ik > end:
                break
            key = bytes(ik[10:])
            keys.append(key)
            wb.delete(ik)
            raw = self._db.get(b"e" + key)
            if raw is not None:
                dues = _unpack(bytes(raw))
                dues[lane] = None
                if all(d is None for d in dues):
                    wb.delete(b"e" + key)
                else:
                    wb.put(b"e" + key, _pack((dues[0], dues[1], dues[2], dues[3], dues[4])))
        if keys:
            self._db.write(wb)
        return keys

    def get_meta(self, name: bytes) -> bytes | None:
        v = self._db.get(b"m" + name)
        return None if v is None else bytes(v)

    def put_meta(self, name: bytes, value: bytes) -> None:
        self._db.put(b"m" + name, value)

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self._db.close()
