"""Slots of a ring keyed by impression id: the newest ``capacity`` keys each hold a slot, and a new
key takes the oldest one (its key is forgotten). The served level's and the served step rate's
counts (``stream.learn.served_level``, ``stream.learn.served_ratio``) keep their columns in these slots.

>>> r = KeyedSlots(2)
>>> [r.claim(k) for k in "abc"], r.size, sorted(r.slot), r.order()
([0, 1, 0], 2, ['b', 'c'], [1, 0])
"""

from __future__ import annotations


class KeyedSlots:
    """The slot of each of the newest ``capacity`` keys; ``order()`` lists the slots oldest first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.keys: list[str | None] = [None] * capacity
        self.slot: dict[str, int] = {}
        self.size = 0
        self._next = 0

    def claim(self, key: str) -> int:
        """The slot a new ``key`` takes: the oldest one, whose key is forgotten."""
        k = self._next
        old = self.keys[k]
        if old is not None:
            del self.slot[old]
        self.keys[k], self.slot[key] = key, k
        self._next = (k + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        return k

    def order(self) -> list[int]:
        """The kept slots, oldest first (a checkpoint's order)."""
        n, k = self.size, self._next
        return [(k - n + j) % self.capacity for j in range(n)]
