"""Label conservation under real-world delivery, with hand-made events (not the simulator).

Every accepted impression yields exactly one final sample whose labels follow from the event
times and the windows (README, "Label conservation"); every event that does not count is
dead-lettered. Expected values are written by hand from those rules.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.join.funnel import FunnelConfig
from tests.joinhelpers import JoinDriver, event_bytes

T0 = 1_767_225_600_000  # 2026-01-01
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
POLICIES = ("early", "matured")


def _driver(policy: str, tmp_path: Path | None, **kw: object) -> JoinDriver:
    return JoinDriver(FunnelConfig(policy=policy), db_dir=tmp_path, start_ms=T0, **kw)  # type: ignore[arg-type]


def _deliver(d: JoinDriver, events: list[tuple[int, int, str, int]]) -> None:
    """(deliver_ms, step, impression id, event time) in any order: delivered in time order."""
    for at, step, iid, t in sorted(events):
        d.feed(step, iid.encode(), event_bytes(step, iid, t), at)


def _background(every_ms: int, until_ms: int) -> list[tuple[int, int, str, int]]:
    """Impressions with no click, in real time: they keep every topic's clock moving."""
    return [(t, 0, f"bg-{i}", t) for i, t in enumerate(range(T0, until_ms, every_ms))]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backend", ["memory", "rocksdb"])
def test_daily_activation_file_keeps_every_activation(policy: str, backend: str, tmp_path: Path) -> None:
    events = _background(5 * MIN, T0 + 24 * DAY)
    funnels = {}
    for i in range(60):
        imp = T0 + i * 3 * HOUR
        iid = f"f-{i}"
        times = [imp, imp + MIN, imp + 5 * MIN, imp + 10 * MIN, imp + 10 * MIN + HOUR + i * 2 * HOUR]
        funnels[iid] = times
        events += [(t, s, iid, t) for s, t in enumerate(times[:4])]
        act = times[4]
        file_at = (act // DAY + 1) * DAY + 2 * HOUR  # the day's file, at 02:00 the next day
        events.append((file_at + (act % DAY) // 1000, 4, iid, act))
    d = _driver(policy, tmp_path if backend == "rocksdb" else None)
    _deliver(d, events)
    d.idle(5 * 60_000)
    finals = d.finals()
    for iid in funnels:
        assert [s.labels for s in finals.get(iid, [])] == [(1, 1, 1, 1)], iid
    assert not d.got.dead
    # the background impressions: one final each, no click
    mature = [iid for _, s, iid, t in events if s == 0 and iid.startswith("bg") and t + 2 * HOUR < T0 + 24 * DAY]
    assert all([s.labels for s in finals.get(iid, [])] == [(0, 0, 0, 0)] for iid in mature)


@pytest.mark.parametrize("policy", POLICIES)
def test_activation_read_an_hour_late_gets_its_final(policy: str) -> None:
    imp = T0 + HOUR
    steps = [imp, imp + MIN, imp + 20 * MIN, imp + 30 * MIN, imp + 5 * DAY]
    events = _background(10 * MIN, T0 + 45 * DAY)
    events += [(t + (HOUR if s == 4 else 0), s, "x", t) for s, t in enumerate(steps)]
    d = _driver(policy, None)
    _deliver(d, events)
    assert [s.labels for s in d.finals().get("x", [])] == [(1, 1, 1, 1)]
    assert "x" not in d.dead_reasons()


@pytest.mark.parametrize("policy", POLICIES)
def test_application_read_a_day_late_gets_its_final(policy: str) -> None:
    imp = T0 + HOUR
    events = _background(10 * MIN, T0 + 6 * DAY)
    events += [(imp, 0, "x", imp), (imp + MIN, 1, "x", imp + MIN), (imp + DAY + 3 * HOUR, 2, "x", imp + HOUR)]
    d = _driver(policy, None)
    _deliver(d, events)
    assert [s.labels for s in d.finals().get("x", [])] == [(1, 1, 0, 0)]
    assert "x" not in d.dead_reasons()


YEAR_2100 = 4_102_444_800_000


@pytest.mark.parametrize("step", [0, 4])
@pytest.mark.parametrize("when", ["first record", "after warm-up"])
def test_one_future_record_does_not_move_the_watermark(when: str, step: int, tmp_path: Path) -> None:
    """Without the future check (replays), a record stamped in 2100 must not move the watermark,
    in warm-up or after it, before or after a restart."""
    d = _driver("early", tmp_path, max_future_ms=0)
    events = _background(10 * MIN, T0 + 2 * DAY)
    first, rest = events[:1], events[1:]
    if when == "after warm-up":
        first, rest = events[:100], events[100:]
    _deliver(d, first)
    d.feed(step, b"odd", event_bytes(step, "odd", YEAR_2100), d.clock.now_ms())
    _deliver(d, rest[:50])
    d.restart()
    _deliver(d, rest[50:])
    d.idle(60_000)
    late = [k for k, reasons in d.dead_reasons().items() if "late" in reasons]
    assert late == []
    finals = d.finals()
    done = [iid for _, s, iid, t in events if t + 2 * HOUR < T0 + 2 * DAY]
    assert all(len(finals.get(iid, [])) == 1 for iid in done)


def test_events_stamped_far_in_the_future_are_dead_lettered() -> None:
    d = _driver("early", None)  # JOINER_MAX_FUTURE_MS default: 1 h
    now = d.clock.now_ms()
    d.feed(0, b"soon", event_bytes(0, "soon", now + 59 * MIN), now)
    d.feed(0, b"later", event_bytes(0, "later", now + 2 * HOUR), now)
    d.feed(2, b"soon", event_bytes(2, "soon", now + 3 * HOUR), now)
    assert d.dead_reasons() == {"later": ["future"], "soon": ["future"]}
    assert d.join.open_funnels() == 1  # nothing of the future event is kept
    off = _driver("early", None, max_future_ms=0)
    off.feed(0, b"later", event_bytes(0, "later", now + 2 * HOUR), now)
    assert not off.got.dead and off.join.open_funnels() == 1
