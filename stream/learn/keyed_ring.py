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

    def compact(self, kept: list[int]) -> None:
        """Keep only the slots ``kept`` (oldest first), moved to slots 0..m-1 in that order; a
        subclass moves its columns the same way (``column[:m] = column[kept]``).

        >>> r = KeyedSlots(3)
        >>> [r.claim(k) for k in "abcd"], r.order()
        ([0, 1, 2, 0], [1, 2, 0])
        >>> r.compact([1, 0]); r.size, r.slot
        (2, {'b': 0, 'd': 1})
        >>> r.claim("e"), r.order()
        (2, [0, 1, 2])
        """
        keys = [self.keys[k] for k in kept]
        m = len(keys)
        self.keys = [*keys, *[None] * (self.capacity - m)]
        self.slot = {key: i for i, key in enumerate(keys) if key is not None}
        self.size = m
        self._next = m % self.capacity
