"""Delivery profiles: when each simulated event reaches Kafka, and what time its source stamps on it.

The world is not a stream of events delivered the moment they happen. A profile maps an event
(its step, bank, true time and Kafka partition) to the time its record is delivered, and to the
event time its source writes into it:

- ``realtime``: every event is delivered within half a second of happening; every clock is right.
- ``batch-feeds``: impressions, clicks and applications are real time; each bank exports its
  approvals once an hour (the previous hour's, at minute 5 + 9 x bank) and its activations in
  one file a day (the previous calendar day's, at 02:00 + 2 min x bank), each file in event-time
  order. An activation reaches Kafka up to 26 h 10 min after it happened.
- ``lagging``: the applications topic runs 3 hours behind; one partition of the impressions
  topic stalls for 3 hours every day (10:00-13:00; a different partition each day: nothing of it
  is delivered meanwhile, a fault's copies neither) and then delivers its backlog; and each
  bank's clock is off (applications, approvals and activations are stamped by the bank: -7 min
  to +4 min), so some applications are stamped before the click that led to them.

``max_delay_ms`` is the most a profile delays a step's events beyond half a second: what
``JOINER_ALLOWED_LATENESS_MS_<STEP>`` must cover (see README, "Label conservation").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from simulators.funnel import DAY_MS, FIELDS, HOUR_MS

MINUTE_MS: Final = 60_000
PROFILES: Final = ("realtime", "batch-feeds", "lagging")
IMPRESSION, APPLICATION, APPROVAL, ACTIVATION = 0, 2, 3, 4
N_BANKS: Final = dict((f[0], f[1]) for f in FIELDS)["bank_id"]


def _spread(t: int, period_ms: int) -> int:
    """Up to 1 s of spread inside a file, increasing with event time, so a file is in time order."""
    return (t % period_ms) * 1000 // period_ms


@dataclass(frozen=True)
class DeliveryProfile:
    """A delivery profile (see the module doc); ``stamp`` and ``deliver`` are pure functions."""

    name: str
    # clock error of each bank's systems (applications, approvals, activations), by bank index
    bank_skew_ms: tuple[int, ...] = ()
    # extra delay of every event of a step (step index -> ms)
    lag_ms: dict[int, int] = field(default_factory=dict)
    # steps whose events a bank exports in files: step -> (period, first export after the period)
    batch_ms: dict[int, tuple[int, int]] = field(default_factory=dict)
    # minutes between two banks' exports of one step
    bank_offset_ms: dict[int, int] = field(default_factory=dict)
    # a stalled partition: (step, start in the day, duration); partition = day % partitions
    stall: tuple[int, int, int] | None = None

    def stamp(self, step: int, bank: int, t_ms: int) -> int:
        """The event time the event's source writes into it (its clock may be off)."""
        if step < APPLICATION or not self.bank_skew_ms:
            return t_ms
        return t_ms + self.bank_skew_ms[bank % len(self.bank_skew_ms)]

    def deliver(self, step: int, bank: int, partition: int, partitions: int, t_ms: int, jitter_ms: int) -> int:
        """When the event that truly happened at ``t_ms`` is delivered to Kafka."""
        batch = self.batch_ms.get(step)
        if batch is not None:
            period, after = batch
            end = (t_ms // period + 1) * period  # the file covers the period the event is in
            return end + after + bank * self.bank_offset_ms.get(step, 0) + _spread(t_ms, period)
        return self.hold(step, partition, partitions, t_ms + self.lag_ms.get(step, 0) + jitter_ms)

    def hold(self, step: int, partition: int, partitions: int, at: int) -> int:
        """A record of ``step`` meant for delivery at ``at``, as a stalled partition lets it through:
        inside its stall, at the stall's end (the backlog, in order, within ~1 s). Every record of
        the partition - a fault's duplicate or held-up copy too: a stalled partition delivers
        nothing. A time already let through is kept."""
        if self.stall is not None and step == self.stall[0]:
            _, start, length = self.stall
            day = at // DAY_MS
            begin = day * DAY_MS + start
            stalled = day % partitions  # a different partition each day
            if partition == stalled and begin <= at < begin + length:
                return begin + length + (at - begin) // 10_000
        return at

    def max_delay_ms(self, step: int) -> int:
        """The longest delay of ``step``'s events beyond the real-time jitter."""
        batch = self.batch_ms.get(step)
        if batch is not None:
            period, after = batch
            return period + after + (N_BANKS - 1) * self.bank_offset_ms.get(step, 0) + 1000
        lag = self.lag_ms.get(step, 0)
        if self.stall is not None and step == self.stall[0]:
            lag += self.stall[2] + 1000
        # a clock that runs behind stamps an earlier time: the event looks that much later
        behind = -min(self.bank_skew_ms, default=0) if step >= APPLICATION else 0
        return lag + max(0, behind)


def profile(name: str) -> DeliveryProfile:
    """The named profile (``realtime``, ``batch-feeds`` or ``lagging``)."""
    makers: dict[str, Callable[[], DeliveryProfile]] = {
        "realtime": lambda: DeliveryProfile("realtime"),
        "batch-feeds": lambda: DeliveryProfile(
            "batch-feeds",
            batch_ms={APPROVAL: (HOUR_MS, 5 * MINUTE_MS), ACTIVATION: (DAY_MS, 2 * HOUR_MS)},
            bank_offset_ms={APPROVAL: 9 * MINUTE_MS, ACTIVATION: 2 * MINUTE_MS},
        ),
        "lagging": lambda: DeliveryProfile(
            "lagging",
            bank_skew_ms=(0, 90_000, -3 * MINUTE_MS, 4 * MINUTE_MS, -7 * MINUTE_MS, 0),
            lag_ms={APPLICATION: 3 * HOUR_MS},
            stall=(IMPRESSION, 10 * HOUR_MS, 3 * HOUR_MS),
        ),
    }
    if name not in makers:
        raise ValueError(f"unknown delivery profile {name!r}; choose one of {', '.join(PROFILES)}")
    return makers[name]()
