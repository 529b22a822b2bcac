"""A ``LabelStore`` in RocksDB (rocksdict) with the expiry index stored beside the states.

Key layout (one DB per partition)::

    b"s" + key                      -> state bytes
    b"d" + key                      -> due time (8 bytes big-endian): finds the old index entry
    b"x" + due (8 bytes BE) + key   -> b""   the expiry index, sorted by due event time
    b"m" + name                     -> metadata (e.g. the swept watermark)

Due times are offset by 2**63 so negative values sort correctly. Every update is one
``WriteBatch``, so a crash never leaves the index and the states out of step.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rocksdict import Options, Rdict, WriteBatch

_BIAS: Final = 2**63
_U64 = struct.Struct(">Q")


def due_key(due_ms: int, key: bytes) -> bytes:
    """Index key that sorts by due time, then key."""
    return b"x" + _U64.pack(due_ms + _BIAS) + key


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
        self._count = self._scan_count()

    def _scan_count(self) -> int:
        n = 0
        for item in self._db.keys(from_key=b"s"):
            if not bytes(item).startswith(b"s"):  # type: ignore[arg-type]
                break
            n += 1
        return n

    def get(self, key: bytes) -> bytes | None:
        v = self._db.get(b"s" + key)
        return None if v is None else bytes(v)

    def _schedule(self, wb: WriteBatch, key: bytes, due_ms: int | None) -> None:
        old = self._db.get(b"d" + key)
        if old is not None:
            old_due = _U64.unpack(old)[0] - _BIAS
            if old_due == due_ms:
                return
            wb.delete(due_key(old_due, key))
        if due_ms is None:
            if old is not None:
                wb.delete(b"d" + key)
        else:
            wb.put(b"d" + key, _U64.pack(due_ms + _BIAS))
            wb.put(due_key(due_ms, key), b"")

    def put(self, key: bytes, value: bytes, due_ms: int | None) -> None:
        wb = WriteBatch(raw_mode=True)
        if self._db.get(b"s" + key) is None:
            self._count += 1
        wb.put(b"s" + key, value)
        self._schedule(wb, key, due_ms)
        self._db.write(wb)

    def reschedule(self, key: bytes, due_ms: int | None) -> None:
        if self._db.get(b"s" + key) is None:
            return
        wb = WriteBatch(raw_mode=True)
        self._schedule(wb, key, due_ms)
        self._db.write(wb)

    def delete(self, key: bytes) -> None:
        if self._db.get(b"s" + key) is None:
            return
        wb = WriteBatch(raw_mode=True)
        wb.delete(b"s" + key)
        self._schedule(wb, key, None)
        self._db.write(wb)
        self._count -= 1

    def pop_due(self, until_ms: int) -> list[bytes]:
        end = b"x" + _U64.pack(until_ms + _BIAS) + b"\xff" * 8
        keys: list[bytes] = []
        wb = WriteBatch(raw_mode=True)
        for item in self._db.keys(from_key=b"x"):
            ik = bytes(item)  # type: ignore[arg-type]  # raw mode: keys are bytes
            if not ik.startswith(b"x") or ik > end:
                break
            key = bytes(ik[9:])
            keys.append(key)
            wb.delete(ik)
            wb.delete(b"d" + key)
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
