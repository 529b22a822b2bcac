"""Consumer offsets against high watermarks, for every Kafka client we use: lag and recreated topics.

Three clients read topics here: kafka-python (the scorer), aiokafka (the trainer's feed) and
faust (the joiner, aiokafka underneath). What they share is decided once, in this module:

- **lag** is the high watermark from the last fetch response minus the next offset to read,
  summed over partitions, never negative; None before any fetch answered (not the broker's
  ListOffsets: the embedded broker's is wrong, its fetch answer is not);
- a partition whose position **stays past its high watermark** was recreated (a broker that lost
  its data, like the embedded one after a restart): it is read again from its first offset, with
  a warning. Each client then seeks with its own call (``rewind_sync`` for kafka-python,
  ``rewind_async`` for aiokafka and faust). *Stays*: a ``RecreatedGuard`` confirms it over
  ``confirm_s`` with neither the position nor the high watermark moving. A single observation is
  not enough: a joiner restarted under load saw a stale high watermark below its committed
  position until its partitions' first fetch answered, and rewinding then re-read every record
  from offset 0 (late dead letters and repeated finals in the chaos bench, docs/joiner.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from aiokafka.errors import IllegalStateError

log = logging.getLogger(__name__)
K = TypeVar("K")


def lag(highwater: Mapping[K, int], position: Mapping[K, int], default: Mapping[K, int] | None = None) -> int | None:
    """Records behind: sum over the partitions in ``highwater`` of high watermark minus position
    (``default[p]``, else 0, where no position is known), never negative; None without any high
    watermark yet.

    >>> lag({0: 20, 1: 7}, {0: 5}), lag({0: 20}, {0: 25}), lag({}, {0: 1})
    (22, 0, None)
    """
    if not highwater:
        return None
    start = default or {}
    return sum(max(0, hw - position.get(p, start.get(p, 0))) for p, hw in highwater.items())


def recreated(position: int | None, highwater: int | None) -> bool:
    """Whether a partition read up to ``position`` was recreated under the reader: its high
    watermark is known and below the position (a live partition's never is)."""
    return position is not None and highwater is not None and position > highwater


class RecreatedGuard:
    """Confirms a partition as recreated only when it stays past its high watermark for
    ``confirm_s`` (clock seconds) with neither its position nor its high watermark moving: a live
    partition's next fetch answer lifts the high watermark to at least the position.

    >>> now = [0.0]
    >>> g = RecreatedGuard(confirm_s=10, clock=lambda: now[0])
    >>> g.confirmed("p", 8, 3), g.confirmed("p", 8, 9)  # stale once, then a fetch answered
    (False, False)
    >>> g.confirmed("p", 8, 3); now[0] = 10.0; g.confirmed("p", 8, 3)  # stays past it: recreated
    False
    True
    """

    def __init__(self, confirm_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.confirm_s = confirm_s
        self.clock = clock
        self._since: dict[Any, tuple[int, int, float]] = {}  # tp -> (position, high watermark, first seen)

    def confirmed(self, tp: Any, position: int | None, highwater: int | None) -> bool:
        if not recreated(position, highwater):
            self._since.pop(tp, None)
            return False
        assert position is not None and highwater is not None
        seen = self._since.get(tp)
        now = self.clock()
        if seen is None or seen[:2] != (position, highwater):
            self._since[tp] = (position, highwater, now)
            return self.confirm_s <= 0
        return now - seen[2] >= self.confirm_s

    def forget(self, tp: Any) -> None:
        self._since.pop(tp, None)


def highwater(consumer: Any, tp: Any) -> int | None:
    """A partition's high watermark from the last fetch response (any of the three clients); None
    when unknown or when the partition is no longer assigned - a rebalance between listing it and
    asking, where aiokafka raises (which crashed the joiner from a timer)."""
    try:
        hw: int | None = consumer.highwater(tp)
    except (AssertionError, IllegalStateError):
        return None
    return hw


def _warn(tp: Any, position: int, highwater: int) -> None:
    log.warning("%s[%d]: position %d is past the high watermark %d - the topic was recreated; reading it from the start",
                tp.topic, tp.partition, position, highwater)  # fmt: skip


def positions_sync(consumer: Any) -> Iterator[tuple[Any, int, int]]:
    """(partition, high watermark, position) of each assigned partition of a kafka-python consumer
    whose high watermark (from the last fetch response) and position are both known."""
    for tp in consumer.assignment():
        hw = consumer.highwater(tp)
        if hw is None:
            continue
        try:
            pos = consumer.position(tp, timeout_ms=0)
        except Exception:  # position unknown yet (being reset): skip it for now
            continue
        if pos is not None:
            yield tp, hw, pos


def lag_sync(consumer: Any) -> int | None:
    """``lag`` over a kafka-python consumer's assigned partitions."""
    known = list(positions_sync(consumer))
    return lag({tp: hw for tp, hw, _ in known}, {tp: pos for tp, _, pos in known}) if known else None


def rewind_sync(consumer: Any, guard: RecreatedGuard | None = None) -> list[Any]:
    """Seek a kafka-python consumer's recreated partitions (confirmed by ``guard``; None: at once)
    to their beginning; returns them."""
    rewound = []
    for tp, hw, pos in positions_sync(consumer):
        if guard.confirmed(tp, pos, hw) if guard is not None else recreated(pos, hw):
            _warn(tp, pos, hw)
            consumer.seek_to_beginning(tp)
            rewound.append(tp)
            if guard is not None:
                guard.forget(tp)
    return rewound


async def rewind_async(consumer: Any, tps: Iterable[Any], highwater: Mapping[Any, int | None],
                       guard: RecreatedGuard | None = None) -> list[Any]:
    """Seek an aiokafka or faust consumer's recreated partitions among ``tps`` (confirmed by
    ``guard``; None: at once) to offset 0 (where a recreated partition starts); ``highwater[tp]``
    as the client last saw it. Returns them."""
    rewound = []
    for tp in tps:
        hw = highwater.get(tp)
        if hw is None:
            continue
        try:
            pos = await consumer.position(tp)
        except IllegalStateError:  # revoked by a rebalance since the caller listed it
            continue
        if guard.confirmed(tp, pos, hw) if guard is not None else recreated(pos, hw):
            _warn(tp, pos, hw)
            seeking = consumer.seek(tp, 0)  # aiokafka: a plain call; faust: a coroutine
            if seeking is not None:
                await seeking
            rewound.append(tp)
            if guard is not None:
                guard.forget(tp)
    return rewound
