"""The label store: funnel states by impression id plus an explicit expiry index.

The index maps each key to the event time (watermark value) at which it is next *due* for a
sweep; ``pop_due(wm)`` hands back the keys due by ``wm``. Expiry is explicit (swept by the
joiner), never a storage TTL that a changelog cannot see. One store holds one partition.

>>> s = InMemoryStore(); s.put(b"i-1", b"state", due_ms=10); s.pop_due(9), s.pop_due(10)
([], [b'i-1'])
"""

from __future__ import annotations

import heapq
from typing import Protocol


class LabelStore(Protocol):
    """Funnel states of one partition, plus the due-time index and a little metadata."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes, due_ms: int | None) -> None:
        """Write ``value`` and (re)schedule the key at ``due_ms`` (None: not scheduled)."""

    def reschedule(self, key: bytes, due_ms: int | None) -> None:
        """Move the key in the index only (the value is unchanged)."""

    def delete(self, key: bytes) -> None: ...

    def pop_due(self, until_ms: int) -> list[bytes]:
        """Keys due at or before ``until_ms``, in due order, removed from the index."""

    def get_meta(self, name: bytes) -> bytes | None: ...

    def put_meta(self, name: bytes, value: bytes) -> None: ...

    def __len__(self) -> int:
        """Number of states held (the open and retained funnels)."""


class DueIndex:
    """An in-memory due-time index: a heap with lazy deletion plus the current due per key."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, bytes]] = []
        self._due: dict[bytes, int] = {}

    def set(self, key: bytes, due_ms: int | None) -> None:
        old = self._due.get(key)
        if due_ms is None:
            self._due.pop(key, None)
        elif old != due_ms:
            self._due[key] = due_ms
            heapq.heappush(self._heap, (due_ms, key))
            if len(self._heap) > 4 * len(self._due) + 1024:
                self._compact()

    def pop_due(self, until_ms: int) -> list[bytes]:
        out: list[bytes] = []
        heap, due = self._heap, self._due
        while heap and heap[0][0] <= until_ms:
            d, key = heapq.heappop(heap)
            if due.get(key) == d:
                del due[key]
                out.append(key)
        return out

    def head(self) -> int | None:
        """The earliest due time (possibly a stale entry: a lower bound)."""
        return self._heap[0][0] if self._heap else None

    def _compact(self) -> None:
        self._heap = [(d, k) for k, d in self._due.items()]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._due)


class InMemoryStore:
    """A dict-backed ``LabelStore`` (tests and the pure-core examples)."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._meta: dict[bytes, bytes] = {}
        self._index = DueIndex()

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def put(self, key: bytes, value: bytes, due_ms: int | None) -> None:
        self._data[key] = value
        self._index.set(key, due_ms)

    def reschedule(self, key: bytes, due_ms: int | None) -> None:
        if key in self._data:
            self._index.set(key, due_ms)

    def delete(self, key: bytes) -> None:
        self._data.pop(key, None)
        self._index.set(key, None)

    def pop_due(self, until_ms: int) -> list[bytes]:
        return self._index.pop_due(until_ms)

    def get_meta(self, name: bytes) -> bytes | None:
        return self._meta.get(name)

    def put_meta(self, name: bytes, value: bytes) -> None:
        self._meta[name] = value

    def __len__(self) -> int:
        return len(self._data)
