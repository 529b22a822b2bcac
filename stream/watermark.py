"""Per-partition event-time watermark over the five co-partitioned event topics.

``wm = min(impression frontier, backlog frontier) - allowed_lateness``. A topic's *frontier* is
the median event time of its last five records on this partition (one record stamped in the
future, or delivered very late, does not move it); the backlog frontier is the smallest frontier
among the topics that still have a backlog (last consumed offset + 1 < high watermark). So:

- the impressions topic is the clock: every funnel starts with an impression and it is the
  densest topic. A later-step event stamped in the future (a producer's clock, or a record
  delivered before it happened) cannot drag the watermark forward and finalise funnels early;
- live (every topic caught up): the watermark follows the newest impression; a sparse topic
  (activations) that is merely quiet does not hold it back;
- catching up (after a restart, or a bench reading a backlog): a consumer reads topics at
  similar *record* rates, so sparse topics race ahead in event time; the topics with a backlog
  hold the watermark back and nothing is finalised before its events were read;
- ``allowed_lateness`` absorbs the skew that remains while live (topics fetched a little apart,
  small reorderings). A larger value means fewer ``late`` dead letters and later samples.

Before a partition has had ``warmup_s`` of wall time since its first record the watermark is
undefined: every topic with a backlog delivers a record within that time and gets counted.
The watermark never goes back.

``event_watermark(step)`` is what an arriving event is judged against: the larger of the
partition watermark and its *own topic's* frontier minus the lateness. While catching up, a
consumer reads a sparse topic far ahead of the impressions; a record delivered twenty days late
sits among records twenty days newer in its own topic, and is recognised as ``late`` there.
"""

from __future__ import annotations

from stream.funnel import NO_WATERMARK

_RECENT = 5


class PartitionWatermark:
    """Watermark of one partition; feed it every record's (step, event time, backlog flag)."""

    __slots__ = ("_behind", "_lateness", "_recent", "_seen", "_since", "_value", "_warmup_s")

    def __init__(self, lateness_ms: int, warmup_s: float = 0.0, floor_ms: int = NO_WATERMARK) -> None:
        self._lateness = lateness_ms
        self._warmup_s = warmup_s
        self._seen: list[int | None] = [None] * 5
        self._behind = [False] * 5
        self._recent: list[list[int]] = [[] for _ in range(5)]
        self._since: float | None = None
        self._value = floor_ms

    def observe(self, step: int, event_time_ms: int, behind: bool, now_s: float) -> None:
        recent = self._recent[step]
        recent.append(event_time_ms)
        if len(recent) > _RECENT:
            del recent[0]
        self._seen[step] = sorted(recent)[len(recent) // 2]
        self._behind[step] = behind
        if self._since is None:
            self._since = now_s

    def frontier(self, step: int) -> int | None:
        """Median event time of the topic's last few records on this partition."""
        return self._seen[step]

    def event_watermark(self, step: int) -> int:
        """The watermark an arriving event of ``step`` is judged against (see the module doc)."""
        f = self._seen[step]
        if f is None or f - self._lateness <= self._value:
            return self._value
        return f - self._lateness

    def advance(self, now_s: float) -> int:
        """Recompute (monotone) and return the watermark."""
        if self._since is None or now_s - self._since < self._warmup_s:
            return self._value
        hi = self._seen[0]
        if hi is None:
            return self._value
        lagging = [s for s, b in zip(self._seen, self._behind, strict=True) if b and s is not None]
        wm = min(min(lagging), hi) if lagging else hi
        wm -= self._lateness
        if wm > self._value:
            self._value = wm
        return self._value

    @property
    def value(self) -> int:
        return self._value

    def lag_ms(self) -> int | None:
        """Impression frontier minus the watermark (None before both exist)."""
        f = self._seen[0]
        if f is None or self._value == NO_WATERMARK:
            return None
        return f - self._value
