"""Per-topic event-time watermarks of one partition: one *lane* per event topic.

A funnel's final waits for the topic of the step it is missing (a click-less impression for the
clicks topic, an approved application for the activations topic), the way a two-stream join in
Flink waits for each input's watermark. Each lane's watermark is::

    lane k = max(previous, frontier(k) - allowed_lateness[k])             while topic k is active
    lane k = max(previous, max(frontier(k), frontier(0) one idle timeout ago) - allowed_lateness[k])
                                                                                   while it is idle

- A topic's *frontier* is the second-newest event time among its last five records on this
  partition: no single record moves it, however far in the future it is stamped (it needs two
  records; a record delivered very late does not lower it either). For the step topics (1..4)
  their newest record counts too, but only up to the impressions' frontier: a sparse topic
  (one activation a day on a partition) is not held a record behind, and one record stamped in
  the future still moves its lane no further than the impressions have gone.
- ``allowed_lateness[k]`` (``JOINER_ALLOWED_LATENESS_MS_<STEP>``) is how late, in event time, the
  topic's records may arrive behind the newest ones: a partner's hourly export, a daily file. An
  in-window event that arrives within it still counts; finals of that lane wait that much longer.
- A topic is *idle* when it is read to its end (no backlog: last offset read + 1 = its high
  watermark) and has delivered nothing for ``idle_timeout_s`` of **wall time** (the injected
  clock's monotonic seconds, as Flink's ``withIdleness``). An idle topic cannot stall its lane: it
  follows the impressions topic (the partition's clock, the densest topic) **as it was one idle
  timeout ago**, less its own allowed lateness - a source that is silent because nothing
  happened is then judged by the impressions. A topic with a backlog is never idle (a consumer
  behind, e.g. under CPU load or after a restart, holds its lane until it has read the records);
  a topic whose position is unknown (never read, never reported) is not idle either.
- Why one idle timeout ago: when every topic falls silent at once (a source's outage, a joiner
  that stalled), every topic goes idle; the source then catches up in a burst, and a producer's
  batch of three hours of impressions can land milliseconds before the batch of the clicks of
  those hours. Following the impressions' frontier of that moment judged those clicks three hours
  late (``bench chaos --seed 41 --delivery batch-feeds --cpu-hog``: 25 wrong labels, round 16).
  Records delivered within the idle timeout (wall time) of the impressions that moved the
  frontier are never judged against them; the price is that an idle topic's lane follows the
  impressions one idle timeout later. The frontier's history is noted at most once per 64th of
  the idle timeout (``note_clock``; the join notes it once per batch), each value at or before
  the moment it stands for, so the lane is never ahead of the rule.
- The impressions lane (0) is never idle-advanced: it is the clock. It drives first samples and
  gives up on events whose impression never came.

Lanes never go back; they start from the swept values stored with the partition's state, so a
restart resumes where the last sweep was. No warm-up is needed: a lane moves only on its own
topic's records or once that topic is known to be idle. The topics' recent event times are
stored with the swept values too (``pack_recent``), as they were when that sweep was taken: a
new owner (a rebalance, a restart) starts from the same frontiers, so a partition that gets no
more records after it moved still sees its silent topics go idle and follow the impressions'
clock - without them its lanes stood still until new impressions came, and in a stream's quiet
tail its due finals never went out (found by a stress run of two joiners with one of them
leaving and joining again, scripted in ``bench/rebalance.py``).
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Sequence

from stream.join.funnel import LANES, NO_WATERMARK, Swept

_RECENT = 5
_I64 = struct.Struct(">q")


def pack_recent(recent: Sequence[Sequence[int]]) -> bytes:
    """Each topic's last event times (at most five), as a count byte and big-endian int64s."""
    out = bytearray()
    for times in recent:
        out.append(len(times))
        for t in times:
            out += _I64.pack(t)
    return bytes(out)


def unpack_recent(raw: bytes | None) -> list[list[int]]:
    """``pack_recent``'s lists; none stored (or unreadable): empty lists."""
    empty: list[list[int]] = [[] for _ in range(LANES)]
    if not raw:
        return empty
    out: list[list[int]] = []
    i = 0
    try:
        for _ in range(LANES):
            n = raw[i]
            i += 1
            out.append([_I64.unpack_from(raw, i + 8 * j)[0] for j in range(min(n, _RECENT))])
            i += 8 * n
    except (IndexError, struct.error):
        return empty
    return out if i == len(raw) else empty


class PartitionWatermark:
    """The five lane watermarks of one partition. Feed it every record (``observe``) and what is
    known about each topic's position (``report``); ``advance`` recomputes the lanes."""

    __slots__ = (
        "_behind", "_born", "_dirty", "_hc", "_ht", "_idle_s", "_last", "_lateness", "_quantum", "_recent", "_value",
    )  # fmt: skip

    def __init__(
        self, lateness_ms: Sequence[int], idle_timeout_s: float, floor: Sequence[int], now_s: float,
        recent: Sequence[Sequence[int]] | None = None,
    ) -> None:  # fmt: skip
        """``recent``: each topic's last event times as ``recent()`` gave them (a new owner's start)."""
        if len(lateness_ms) != LANES or len(floor) != LANES:
            raise ValueError(f"a partition has {LANES} lanes: give 5 lateness values and 5 floors")
        self._lateness = tuple(lateness_ms)
        self._idle_s = idle_timeout_s
        self._recent: list[list[int]] = [list(r)[-_RECENT:] for r in recent] if recent else [[] for _ in range(LANES)]
        if len(self._recent) != LANES:
            raise ValueError(f"a partition has {LANES} lanes: give 5 lists of recent event times")
        self._behind: list[bool | None] = [None] * LANES  # None: position unknown
        self._last: list[float | None] = [None] * LANES  # wall time of the topic's last record
        self._born = now_s
        self._value = list(floor)
        # the impressions' frontier as it was (wall time, value), oldest first: what idle topics follow
        self._ht: list[float] = []
        self._hc: list[int] = []
        self._quantum = idle_timeout_s / 64
        self._dirty = True  # the frontier may have moved since it was last noted
        self.note_clock(now_s)  # a new owner's stored frontier: known from its start

    def observe(self, step: int, event_time_ms: int, behind: bool, now_s: float) -> None:
        """One record of topic ``step``; ``behind``: more records follow it in the partition."""
        recent = self._recent[step]
        recent.append(event_time_ms)
        if len(recent) > _RECENT:
            del recent[0]
        self._behind[step] = behind
        self._last[step] = now_s
        if step == 0:
            self._dirty = True  # noted by the caller's ``note_clock`` (the join: once per batch)

    def observe_many(self, step: int, times: Sequence[int], behind: bool, now_s: float) -> None:
        """``observe`` of each of ``times`` in turn (records of topic ``step`` read at ``now_s``;
        ``behind`` the last one's): the compiled join observes a partition's impressions of a batch
        at once, before the next record of another topic of it reads a lane."""
        if not times:
            return
        recent = self._recent[step]
        recent.extend(times[-_RECENT:])
        del recent[:-_RECENT]
        self._behind[step] = behind
        self._last[step] = now_s
        if step == 0:
            self._dirty = True

    def note_clock(self, now_s: float) -> None:
        """Note the impressions' frontier as it is at ``now_s`` if it may have moved: one value per
        instant (the last noted: a batch's records share one instant, and the frontier as the
        batch left it is noted), and a new one at most once per 64th of the idle timeout - a value
        not noted yet is noted by a later call (each sweep makes one), so none stands for a moment
        before it was reached."""
        if not self._dirty:
            return
        ht = self._ht
        same = bool(ht) and now_s == ht[-1]
        if ht and not same and now_s < ht[-1] + self._quantum:
            return  # too soon after the last one: a later call notes it
        clock = self.frontier(0)
        if clock is None:
            return
        self._dirty = False
        if same:
            self._hc[-1] = clock
            return
        ht.append(now_s)
        self._hc.append(clock)
        cut = now_s - self._idle_s  # keep one value at or before the oldest moment looked up
        while len(ht) > 1 and ht[1] <= cut:
            del ht[0], self._hc[0]

    def history(self) -> list[tuple[float, int]]:
        """The impressions' frontier as noted: (wall time, value), oldest first."""
        return list(zip(self._ht, self._hc, strict=True))

    def _clock_ago(self, now_s: float) -> int | None:
        """The impressions' frontier as it was one idle timeout before ``now_s`` (None if unknown)."""
        ht = self._ht
        i = bisect_right(ht, now_s - self._idle_s)
        return self._hc[i - 1] if i else None

    def report(self, step: int, behind: bool) -> None:
        """What the consumer knows of topic ``step``'s position: has it records left to read?"""
        self._behind[step] = behind

    def recent(self) -> tuple[tuple[int, ...], ...]:
        """Each topic's last event times (a snapshot, to store with the swept lanes)."""
        return tuple(tuple(r) for r in self._recent)

    def frontier(self, step: int) -> int | None:
        """Second-newest event time of the topic's last five records (None before two)."""
        recent = self._recent[step]
        if len(recent) < 2:
            return None
        return sorted(recent)[-2]

    def lane(self, step: int, now_s: float) -> int:
        """Lane ``step`` now (call it before observing the next record of the topic): an arriving
        event is judged against it. It is what ``advance`` would make of that lane at this moment,
        so the verdict does not depend on when the last sweep happened; from the topic's own
        records it depends only on those before it in its partition (a backlog read fast is
        judged as live reading would)."""
        imps = self._recent[0]
        self._raise(step, sorted(imps)[-2] if len(imps) > 1 else None, now_s)  # (frontier(0), inline)
        return self._value[step]

    def _raise(self, k: int, clock: int | None, now_s: float) -> None:
        # frontier(k) and idle(k) written out: the join asks each step record's lane (issue 16)
        recent = self._recent[k]
        f = sorted(recent)[-2] if len(recent) > 1 else None
        if k and clock is not None:
            if recent:  # a sparse topic's newest record counts too, up to the impressions' clock
                newest = max(recent)
                if newest > clock:
                    newest = clock
                if f is None or newest > f:
                    f = newest
            last = self._last[k]
            if self._behind[k] is False and now_s - (self._born if last is None else last) >= self._idle_s:  # idle
                ago = self._clock_ago(now_s)  # not the frontier of this moment: see the module doc
                if ago is not None and (f is None or ago > f):
                    f = ago
        if f is not None:
            f -= self._lateness[k]
            if f > self._value[k]:
                self._value[k] = f

    def idle(self, step: int, now_s: float) -> bool:
        """Read to its end and silent for the idle timeout (wall time)."""
        last = self._last[step]
        return self._behind[step] is False and now_s - (self._born if last is None else last) >= self._idle_s

    def advance(self, now_s: float) -> Swept:
        """Recompute the lanes (monotone) and return them."""
        self.note_clock(now_s)
        clock = self.frontier(0)
        for k in range(LANES):
            self._raise(k, clock, now_s)
        v = self._value
        return (v[0], v[1], v[2], v[3], v[4])

    @property
    def value(self) -> Swept:
        v = self._value
        return (v[0], v[1], v[2], v[3], v[4])

    def lag_ms(self) -> int | None:
        """How far the slowest lane is behind the impressions' frontier beyond its allowed lateness
        (about 0 when every topic keeps up; None before the impressions have a frontier)."""
        f = self.frontier(0)
        if f is None:
            return None
        lags = [f - v - lat for v, lat in zip(self._value, self._lateness, strict=True) if v != NO_WATERMARK]
        return max(0, *lags) if lags else None
