"""Per-partition event-time watermark over the five co-partitioned event topics.

``wm = min(frontier, max_seen) - allowed_lateness`` where ``max_seen`` is the largest event time
seen on any of the partition's topics and ``frontier`` is the smallest "seen so far" among the
topics that still have a backlog (last consumed offset + 1 < high watermark). So:

- live (every topic caught up): the watermark follows the newest event; a sparse topic
  (activations) that is merely quiet does not hold it back;
- catching up (after a restart, or a bench reading a backlog): a consumer reads topics at
  similar *record* rates, so sparse topics race ahead in event time; the topics with a backlog
  hold the watermark back and nothing is finalised before its events were read;
- ``allowed_lateness`` absorbs the skew that remains while live (topics fetched a little apart,
  small reorderings). A larger value means fewer ``late`` dead letters and later samples.

Before a partition has had ``warmup_s`` of wall time since its first record the watermark is
undefined: every topic with a backlog delivers a record within that time and gets counted.
The watermark never goes back.
"""

from __future__ import annotations

from stream.funnel import NO_WATERMARK


class PartitionWatermark:
    """Watermark of one partition; feed it every record's (step, event time, backlog flag)."""

    __slots__ = ("_behind", "_lateness", "_seen", "_since", "_value", "_warmup_s")

    def __init__(self, lateness_ms: int, warmup_s: float = 0.0, floor_ms: int = NO_WATERMARK) -> None:
        self._lateness = lateness_ms
        self._warmup_s = warmup_s
        self._seen: list[int | None] = [None] * 5
        self._behind = [False] * 5
        self._since: float | None = None
        self._value = floor_ms

    def observe(self, step: int, event_time_ms: int, behind: bool, now_s: float) -> None:
        seen = self._seen[step]
        if seen is None or event_time_ms > seen:
            self._seen[step] = event_time_ms
        self._behind[step] = behind
        if self._since is None:
            self._since = now_s

    def advance(self, now_s: float) -> int:
        """Recompute (monotone) and return the watermark."""
        if self._since is None or now_s - self._since < self._warmup_s:
            return self._value
        seen = [s for s in self._seen if s is not None]
        if not seen:
            return self._value
        hi = max(seen)
        lagging = [s for s, b in zip(self._seen, self._behind, strict=True) if b and s is not None]
        wm = min(min(lagging), hi) if lagging else hi
        wm -= self._lateness
        if wm > self._value:
            self._value = wm
        return self._value

    @property
    def value(self) -> int:
        return self._value

    def max_seen(self) -> int | None:
        seen = [s for s in self._seen if s is not None]
        return max(seen) if seen else None
