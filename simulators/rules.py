"""The joiner's documented rules (README, "Label conservation"), applied to one impression's events.

This is the simulator's answer key: what the joiner must emit for an impression, computed from
event times and windows alone. It is written from the README's rules and imports nothing from
``stream/`` (the joiner's own state machine must never be its own answer key).

For one impression, given its delivered events (step, stamped event time, whether it parses,
whether it was delivered after its funnel's final could go out):

1. The impression counts if it parses. Step ``k`` (1..4) counts if step ``k-1`` counts and
   ``t[k-1] - skew <= t[k] <= t[k-1] + window[k]`` (a step may be stamped up to ``skew`` before
   its predecessor: sources' clocks differ). Final labels: 1 for the steps that count.
2. The final time is the activation time, or, with ``r`` the last step that counts,
   ``t[r] + window[r+1]``; the final's *lane* is the step whose absence it waits for (``r+1``,
   or the impressions for an activated funnel).
3. Every event that does not count (and is not a duplicate) is dead-lettered:
   parse errors with their code; ``late`` if it was delivered after its funnel's final (beyond
   the allowed lateness) while it would have counted, or if it happened after the final time;
   ``illegal_sequence`` otherwise (its predecessor never counted, it was stamped more than
   ``skew`` before it, or the impression never came).
4. A funnel's state is kept for the retention after its final time, then purged: a record read
   later than that meets an unknown impression - ``illegal_sequence`` (held until the
   impressions' topic is past its grace), or ``late`` if it happened more than the retention
   before the impressions' topic; a copy of the impression, ``late``. Whether a record read
   after ``final time + retention`` finds the state still kept depends on how far the final's
   topic has got (the purge waits for it), so such a record may get its kept funnel's fate or
   an unknown impression's: ``Outcome.purged_fates`` lists the latter. (A funnel whose final
   came early - no click in time - is purged early: an after-window activation 40 days after
   its approval comes long after.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from simulators.funnel import DAY_MS, HOUR_MS, WINDOWS_MS

MINUTE_MS = 60_000
LATE = "late"
ILLEGAL_SEQUENCE = "illegal_sequence"


@dataclass(frozen=True)
class JoinRules:
    """The joiner's documented defaults (README, Configuration), written out again here."""

    windows_ms: tuple[int, int, int, int] = WINDOWS_MS
    grace_ms: int = 10 * MINUTE_MS
    skew_ms: int = 5 * MINUTE_MS
    retention_ms: int = 27 * DAY_MS
    # allowed lateness of the impressions, clicks, applications, approvals and activations topics
    lateness_ms: tuple[int, int, int, int, int] = (30 * MINUTE_MS, 30 * MINUTE_MS, 6 * HOUR_MS, 6 * HOUR_MS, 2 * DAY_MS)


@dataclass(frozen=True, slots=True)
class Delivered:
    """One delivered record of an impression (``parse_reason`` set: it does not parse)."""

    step: int
    time_ms: int  # event time as stamped in the record
    deliver_ms: int
    parse_reason: str | None = None
    after_final: bool = False  # delivered after its funnel's final went out (a ``late`` fault)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the joiner must do with one impression's records."""

    labels: tuple[int, int, int, int] | None  # the final sample's labels; None: no impression
    final_at_ms: int | None  # event time at which the labels are final
    lane: int | None  # the step whose topic's progress decides the final (0: activated)
    fates: tuple[str | None, ...]  # per record: its dead-letter reason, or None (counts/duplicate)
    resolved_at: tuple[int | None, ...]  # per record: delivery time after which its fate is sure,
    # or None when it waits for the final (or, without an impression, for the impressions' topic)
    # per record: None when it is surely read while its funnel's state is kept; else the reasons it
    # gets if the state was purged before it was read (rule 4), besides its fate in ``fates``
    purged_fates: tuple[tuple[str, ...] | None, ...] = ()


def outcome(records: Sequence[Delivered], rules: JoinRules | None = None) -> Outcome:
    """Apply the rules (module doc) to one impression's delivered records."""
    r_ = rules or JoinRules()
    first: dict[int, Delivered] = {}  # the first delivery of each step that parses
    for rec in sorted(records, key=lambda x: x.deliver_ms):
        if rec.parse_reason is None and not rec.after_final and rec.step not in first:
            first[rec.step] = rec
    fates: list[str | None] = []
    resolved: list[int | None] = []
    if 0 not in first:
        for rec in records:
            fates.append(rec.parse_reason or (None if rec.step == 0 else ILLEGAL_SEQUENCE))
            resolved.append(rec.deliver_ms if rec.parse_reason else None)
        return Outcome(None, None, None, tuple(fates), tuple(resolved), (None,) * len(records))
    times = [first[0].time_ms]
    for k in range(1, 5):
        e = first.get(k)
        if e is None or not _in_window(times[-1], e.time_ms, k, r_):
            break
        times.append(e.time_ms)
    r = len(times) - 1
    labels = (int(r >= 1), int(r >= 2), int(r >= 3), int(r >= 4))
    final_at = times[4] if r == 4 else times[r] + r_.windows_ms[r]
    lane = 0 if r == 4 else r + 1
    chain_delivered = max(first[k].deliver_ms for k in range(r + 1))
    for rec in records:
        if rec.parse_reason is not None:
            fates.append(rec.parse_reason)
            resolved.append(rec.deliver_ms)
            continue
        if rec.step <= r:
            fates.append(None)  # counts, or a copy of one that counts
            resolved.append(rec.deliver_ms)
            continue
        in_window = rec.step == r + 1 and _in_window(times[r], rec.time_ms, rec.step, r_)
        if rec.after_final and in_window:
            fates.append(LATE)
            resolved.append(rec.deliver_ms)
        elif rec.time_ms > final_at:
            fates.append(LATE)
            resolved.append(max(rec.deliver_ms, chain_delivered) if rec.step == r + 1 else None)
        else:
            fates.append(ILLEGAL_SEQUENCE)
            resolved.append(max(rec.deliver_ms, chain_delivered) if rec.step == r + 1 else None)
    purged = tuple(_purged_fates(rec, final_at, r_) for rec in records)
    return Outcome(labels, final_at, lane, tuple(fates), tuple(resolved), purged)


def _purged_fates(rec: Delivered, final_at: int, rules: JoinRules) -> tuple[str, ...] | None:
    """Rule 4: the reasons a record gets if its funnel's state is purged before it is read; None
    when it is read before the state can be purged (the purge needs the final's topic past
    ``final_at + retention``, and no record read before that moment can have moved it there)."""
    if rec.parse_reason is not None or rec.deliver_ms < final_at + rules.retention_ms:
        return None
    if rec.step == 0:
        return (LATE,)  # a copy of the impression, older than the retention
    old = rec.time_ms + rules.retention_ms <= rec.deliver_ms  # the impressions' topic may be past it
    return (ILLEGAL_SEQUENCE, LATE) if old else (ILLEGAL_SEQUENCE,)


def _in_window(pred_ms: int, t_ms: int, step: int, rules: JoinRules) -> bool:
    return pred_ms - rules.skew_ms <= t_ms <= pred_ms + rules.windows_ms[step - 1]
