"""The label store: funnel states by impression id plus an explicit expiry index per lane.

The index maps each key to the event time at which it is next *due* on each lane (one lane per
event topic, ``stream.join.watermark``: a funnel's final waits for its missing step's topic, its
first sample for the impressions'); ``pop_due(lane, wm)`` hands back the keys due on that lane
by ``wm``. Expiry is explicit (swept by the joiner), never a storage TTL that a changelog cannot
see. One store holds one partition.

>>> s = InMemoryStore(); s.put(b"i-1", b"state", (10, None, 20, None, None))
>>> s.pop_due(0, 9), s.pop_due(0, 10), s.pop_due(2, 30)
([], [b'i-1'], [b'i-1'])
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Protocol

from stream.join.funnel import LANES, NO_DUES, Dues


class LabelStore(Protocol):
    """Funnel states of one partition, plus the due-time index and a little metadata."""

    def get(self, key: bytes) -> bytes | None: ...

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """``get`` of each key, in one call (RocksDB's multi-get): a fetched batch's states."""

    def put(self, key: bytes, value: bytes, dues: Dues | None) -> None:
        """Write ``value`` and (re)schedule the key on every lane (None: not scheduled)."""

    def put_many(self, items: Iterable[tuple[bytes, bytes, Dues | None]]) -> None:
        """``put`` of each ``(key, value, dues)`` in order (the join's batch of state writes)."""

    def reschedule(self, key: bytes, dues: Dues | None) -> None:
        """Move the key in the index only (the value is unchanged)."""

    def delete(self, key: bytes) -> None: ...

    def pop_due(self, lane: int, until_ms: int) -> list[bytes]:
        """Keys due on ``lane`` at or before ``until_ms``, in due order, removed from that lane."""

    def get_meta(self, name: bytes) -> bytes | None: ...

    def put_meta(self, name: bytes, value: bytes) -> None: ...

    def __len__(self) -> int:
        """Number of states held (the open and retained funnels)."""


class DueIndexLike(Protocol):
    """What a store asks of its in-memory due index (``DueIndex`` or its C twin)."""

    def set(self, key: bytes, dues: Dues | None) -> None: ...

    def pop_due(self, lane: int, until_ms: int) -> list[bytes]: ...

    def __len__(self) -> int: ...


def new_due_index() -> DueIndexLike:
    """The C ``DueIndex`` (``stream.join.fast``) when built, else this module's."""
    from stream.join import fast

    return fast._fastjoin.DueIndex() if fast.AVAILABLE else DueIndex()


class DueIndex:
    """An in-memory due-time index: a heap per lane with lazy deletion plus each key's dues.
    ``stream/join/_fastjoin.c`` has its twin in C (same results; ``new_due_index`` picks it)."""

    def __init__(self) -> None:
        self._heaps: list[list[tuple[int, bytes]]] = [[] for _ in range(LANES)]
        self._due: dict[bytes, Dues] = {}

    def set(self, key: bytes, dues: Dues | None) -> None:
        old = self._due.get(key)
        if dues is None or dues == NO_DUES:
            self._due.pop(key, None)
            return
        if old == dues:
            return
        self._due[key] = dues
        for lane, due in enumerate(dues):
            if due is not None and (old is None or old[lane] != due):
                heap = self._heaps[lane]
                heapq.heappush(heap, (due, key))
                if len(heap) > 4 * len(self._due) + 1024:
                    self._compact(lane)

    def pop_due(self, lane: int, until_ms: int) -> list[bytes]:
        out: list[bytes] = []
        heap, due = self._heaps[lane], self._due
        while heap and heap[0][0] <= until_ms:
            d, key = heapq.heappop(heap)
            cur = due.get(key)
            if cur is not None and cur[lane] == d:
                rest = (*cur[:lane], None, *cur[lane + 1 :])
                if rest == NO_DUES:
                    del due[key]
                else:
                    due[key] = rest  # type: ignore[assignment]  # five entries, as before
                out.append(key)
        return out

    def _compact(self, lane: int) -> None:
        self._heaps[lane] = [(d[lane], k) for k, d in self._due.items() if d[lane] is not None]  # type: ignore[misc]
        heapq.heapify(self._heaps[lane])

    def __len__(self) -> int:
        return len(self._due)


class InMemoryStore:
    """A dict-backed ``LabelStore`` (tests and the pure-core examples)."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._meta: dict[bytes, bytes] = {}
        self._index = new_due_index()

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        get = self._data.get
        return [get(k) for k in keys]

    def put(self, key: bytes, value: bytes, dues: Dues | None) -> None:
        self._data[key] = value
        self._index.set(key, dues)

    def put_many(self, items: Iterable[tuple[bytes, bytes, Dues | None]]) -> None:
        for key, value, dues in items:
            self.put(key, value, dues)

    def reschedule(self, key: bytes, dues: Dues | None) -> None:
        if key in self._data:
            self._index.set(key, dues)

    def delete(self, key: bytes) -> None:
        self._data.pop(key, None)
        self._index.set(key, None)

    def pop_due(self, lane: int, until_ms: int) -> list[bytes]:
        return self._index.pop_due(lane, until_ms)

    def get_meta(self, name: bytes) -> bytes | None:
        return self._meta.get(name)

    def put_meta(self, name: bytes, value: bytes) -> None:
        self._meta[name] = value

    def __len__(self) -> int:
        return len(self._data)
