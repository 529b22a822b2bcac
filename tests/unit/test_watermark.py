"""The per-topic lanes of one partition (stream/join/watermark.py), expected values written by hand."""

from __future__ import annotations

import random

import pytest

from stream.join.funnel import NO_WATERMARK
from stream.join.watermark import PartitionWatermark

T0 = 1_767_225_600_000
MIN, HOUR = 60_000, 3_600_000
LATE = (30 * MIN, 30 * MIN, 6 * HOUR, 6 * HOUR, 48 * HOUR)
NO = (NO_WATERMARK,) * 5
YEAR_2100 = 4_102_444_800_000


def wm(idle_s: float = 30.0, floor: tuple[int, ...] = NO) -> PartitionWatermark:
    return PartitionWatermark(LATE, idle_s, floor, now_s=0.0)


def feed(w: PartitionWatermark, step: int, times: list[int], now: float = 0.0, behind: bool = False) -> None:
    """Records delivered at ``now``, then the impressions' frontier noted, as the join does per batch."""
    for t in times:
        w.observe(step, t, behind, now)
    w.note_clock(now)


def test_frontier_is_the_second_newest_of_the_last_five() -> None:
    w = wm()
    feed(w, 0, [T0])
    assert w.frontier(0) is None  # one record is no frontier
    feed(w, 0, [T0 + MIN])
    assert w.frontier(0) == T0
    feed(w, 0, [T0 + 5 * MIN, T0 + 2 * MIN, T0 + 3 * MIN, T0 + 4 * MIN])
    assert w.frontier(0) == T0 + 4 * MIN  # last five: 1,5,2,3,4 min -> second newest 4 min


@pytest.mark.parametrize("step", [0, 1, 4])
def test_one_record_from_the_year_2100_moves_no_lane(step: int) -> None:
    w = wm()
    feed(w, 0, [T0, T0 + MIN, T0 + 2 * MIN])
    feed(w, step, [YEAR_2100])
    lanes = w.advance(0.0)
    assert max(lanes) < T0 + 3 * MIN
    # nor as the very first record of a partition
    fresh = wm()
    feed(fresh, step, [YEAR_2100])
    assert fresh.advance(100.0) == NO


def test_a_step_topic_follows_its_newest_record_up_to_the_impressions() -> None:
    w = wm()
    feed(w, 0, [T0 + 10 * HOUR, T0 + 11 * HOUR, T0 + 12 * HOUR])  # impressions frontier 11 h
    feed(w, 3, [T0 + 8 * HOUR], behind=True)  # one approval: its newest counts
    assert w.advance(0.0)[3] == T0 + 8 * HOUR - 6 * HOUR
    feed(w, 3, [T0 + 20 * HOUR], behind=True)  # ahead of the impressions: capped by them
    assert w.advance(0.0)[3] == T0 + 11 * HOUR - 6 * HOUR


def test_an_idle_topic_follows_the_impressions_and_a_backlog_holds_its_lane() -> None:
    w = wm(idle_s=30.0)
    feed(w, 0, [T0, T0 + HOUR, T0 + 2 * HOUR], now=0.0)
    assert w.advance(0.0)[1:] == NO[1:]  # clicks never seen, position unknown: not idle
    w.report(1, behind=True)
    assert w.advance(100.0)[1] == NO_WATERMARK  # a backlog is never idle
    w.report(1, behind=False)
    assert w.advance(29.0)[1] == NO_WATERMARK  # read to its end, silent less than 30 s
    assert w.advance(30.0)[1] == T0 + HOUR - 30 * MIN  # idle: impressions frontier - its lateness
    feed(w, 4, [T0], now=31.0)
    w.report(4, behind=False)
    assert w.advance(60.0)[4] == T0 - 48 * HOUR  # a record 29 s ago: not idle, its own records
    assert w.advance(61.0)[4] == T0 + HOUR - 48 * HOUR  # 30 s after it: idle


def test_lanes_never_go_back_and_start_from_the_stored_swept_values() -> None:
    floor = (T0, T0 - 1, T0 - 2, T0 - 3, T0 - 4)
    w = wm(floor=floor)
    assert w.value == floor and w.advance(0.0) == floor
    feed(w, 0, [T0 + 2 * HOUR, T0 + 3 * HOUR])
    assert w.advance(0.0)[0] == T0 + 2 * HOUR - 30 * MIN
    feed(w, 0, [T0 - HOUR] * 5)  # a burst of old records (a replay) lowers the frontier ...
    assert w.advance(0.0)[0] == T0 + 2 * HOUR - 30 * MIN  # ... but not the lane


def test_an_arriving_event_sees_its_own_topic_as_it_is_now() -> None:
    w = wm(idle_s=30.0)
    feed(w, 0, [T0, T0 + 4 * HOUR, T0 + 5 * HOUR])
    w.report(1, behind=False)
    # no sweep ran: the clicks topic has been idle for 40 s, so its lane is already far on
    assert w.lane(1, 40.0) == T0 + 4 * HOUR - 30 * MIN
    assert w.value[1] == T0 + 4 * HOUR - 30 * MIN  # and it stays there


def test_lag_beyond_the_allowed_lateness() -> None:
    w = wm(idle_s=30.0)
    assert w.lag_ms() is None
    feed(w, 0, [T0, T0 + HOUR, T0 + 2 * HOUR])
    for step in range(1, 5):
        w.report(step, behind=False)
    w.advance(100.0)
    assert w.lag_ms() == 0  # every topic idle: each lane exactly its lateness behind
    feed(w, 0, [T0 + 5 * HOUR, T0 + 6 * HOUR], now=100.0)
    w.report(2, behind=True)  # the applications topic has a backlog: its lane is held
    w.advance(100.0)
    assert w.lag_ms() == 4 * HOUR  # impressions at 5 h; applications lane at 1 h - 6 h


def test_five_lateness_values_and_five_floors_or_a_clear_error() -> None:
    with pytest.raises(ValueError, match="a partition has 5 lanes: give 5 lateness values and 5 floors"):
        PartitionWatermark(LATE[:4], 30.0, NO, 0.0)
    with pytest.raises(ValueError, match="5 lanes"):
        PartitionWatermark(LATE, 30.0, NO[:4], 0.0)


def test_the_frontier_forgets_all_but_the_last_five_records() -> None:
    w = wm()
    feed(w, 0, [T0 + HOUR, T0 + 50 * MIN, T0, T0 + MIN, T0 + 2 * MIN])
    assert w.frontier(0) == T0 + 50 * MIN  # last five: 60, 50, 0, 1, 2 min -> second newest 50 min
    feed(w, 0, [T0 + 3 * MIN, T0 + 4 * MIN])
    assert w.frontier(0) == T0 + 3 * MIN  # 60 and 50 min have left the five: 0..4 min


def test_a_record_read_at_the_end_of_its_topic_makes_its_position_known() -> None:
    w = wm(idle_s=30.0)
    feed(w, 0, [T0, T0 + HOUR, T0 + 2 * HOUR], now=0.0)
    feed(w, 1, [T0], now=0.0, behind=False)  # no report(): the record itself says "read to its end"
    feed(w, 2, [T0], now=0.0, behind=True)  # ... or "more follow"
    lanes = w.advance(30.0)
    assert lanes[1] == T0 + HOUR - 30 * MIN  # idle 30 s after its last record: follows the impressions
    assert lanes[2] == T0 - 6 * HOUR  # a backlog: held at its own record


def test_the_idle_timer_of_a_silent_topic_starts_when_the_partition_is_opened() -> None:
    w = PartitionWatermark(LATE, 30.0, NO, now_s=100.0)  # opened (e.g. assigned) at 100 s
    feed(w, 0, [T0, T0 + HOUR, T0 + 2 * HOUR], now=100.0)
    w.report(3, behind=False)  # read to its end, never a record
    assert w.advance(129.0)[3] == NO_WATERMARK
    assert w.advance(130.0)[3] == T0 + HOUR - 6 * HOUR


def test_a_frontier_within_the_lateness_above_the_lane_never_lowers_it() -> None:
    floor = (T0, T0, T0, T0, T0)
    w = wm(floor=floor)
    feed(w, 0, [T0 + 10 * MIN, T0 + 11 * MIN])  # frontier 10 min: 10 min - 30 min lateness < T0
    assert w.advance(0.0) == floor
    assert w.lane(0, 0.0) == T0


def test_an_idle_topic_follows_the_impressions_as_they_were_one_idle_timeout_ago() -> None:
    """A burst of impressions - a source catching up after an outage, a joiner that stalled - moves
    the impressions' frontier hours on in a moment, and the records of a silent topic delivered
    with it land a few milliseconds behind (another producer batch): they must not be judged
    against it. An idle topic follows the frontier as it was one idle timeout ago (wall time)."""
    w = wm(idle_s=2.0)
    feed(w, 0, [T0, T0 + MIN, T0 + 2 * MIN], now=0.0)
    feed(w, 1, [T0 + MIN], now=0.0, behind=False)  # the clicks, read to their end
    assert w.advance(5.0)[1] == T0 + MIN - 30 * MIN  # silent 5 s: idle, at the impressions' frontier
    # the outage ends: three hours of impressions at once, 5 s after the last record
    feed(w, 0, [T0 + k * 10 * MIN for k in range(1, 19)], now=5.0)
    assert w.frontier(0) == T0 + 170 * MIN
    assert w.lane(1, 5.01) == T0 + MIN - 30 * MIN  # not the frontier of 10 ms ago
    assert w.advance(6.9)[1] == T0 + MIN - 30 * MIN
    assert w.advance(7.0)[1] == T0 + 140 * MIN  # one idle timeout after it: follows it
    # a click delivered within the idle timeout of the burst is judged against its own topic
    fresh = wm(idle_s=2.0)
    feed(fresh, 0, [T0, T0 + MIN, T0 + 2 * MIN], now=0.0)
    feed(fresh, 1, [T0 + MIN], now=0.0, behind=False)
    fresh.advance(5.0)
    feed(fresh, 0, [T0 + k * 10 * MIN for k in range(1, 19)], now=5.0)
    assert fresh.lane(1, 5.01) <= T0 + 10 * MIN - 30 * MIN  # a click at 10 min, 10 ms after the burst: in time
    feed(fresh, 1, [T0 + 10 * MIN], now=5.01)
    assert fresh.advance(6.5)[1] == T0 + 10 * MIN - 30 * MIN  # it spoke: not idle, its own newest record


def test_the_impressions_history_an_idle_topic_follows_stays_short() -> None:
    """One value of the impressions' frontier kept per 64th of the idle timeout: a partition read
    for hours keeps about 64, however many impressions it reads."""
    w = wm(idle_s=2.0)
    for i in range(20_000):  # 200 s of impressions, 100 a second, each noted as the join does
        w.observe(0, T0 + i * 1_000, False, i * 0.01)
        w.note_clock(i * 0.01)
    assert len(w.history()) <= 66
    feed(w, 1, [T0], now=200.0, behind=False)
    lane = w.advance(202.0)[1]  # the frontier as it was noted 2 s before (at 199.97-200 s)
    assert T0 + 19_990 * 1_000 - 30 * MIN <= lane <= T0 + 19_998 * 1_000 - 30 * MIN


def test_a_restarted_partition_follows_its_stored_frontier_once_the_idle_timeout_passed() -> None:
    """A new owner starts from the stored recent event times: a quiet tail's silent topics still
    follow the impressions' frontier (as it was stored) one idle timeout after the start."""
    recent = [[T0, T0 + HOUR, T0 + 2 * HOUR], [], [], [], []]
    w = PartitionWatermark(LATE, 30.0, NO, now_s=100.0, recent=recent)
    w.report(1, behind=False)
    assert w.advance(129.0)[1] == NO_WATERMARK
    assert w.advance(130.0)[1] == T0 + HOUR - 30 * MIN


def test_observe_many_is_observe_of_each_in_turn() -> None:
    """The join observes a partition's impressions of a batch at once (before the next record of
    another topic of it reads a lane, and at the batch's end): the same state as one at a time -
    the last five times, the last record's position, the wall time, the frontier to note."""
    rng = random.Random(7)
    for _ in range(300):
        one = PartitionWatermark((0, 5, 0, 0, 0), 10.0, (NO_WATERMARK,) * 5, 0.0)
        many = PartitionWatermark((0, 5, 0, 0, 0), 10.0, (NO_WATERMARK,) * 5, 0.0)
        now = 0.0
        for _ in range(rng.randint(1, 6)):
            now += rng.choice([0.0, 0.5, 20.0])
            step = rng.choice([0, 0, 0, 1, 2])
            times = [rng.randint(0, 1000) for _ in range(rng.randint(0, 8))]
            behind = rng.random() < 0.5
            for t in times:
                one.observe(step, t, behind, now)
            many.observe_many(step, times, behind, now)
            if rng.random() < 0.5:
                one.note_clock(now)
                many.note_clock(now)
            assert one.lane(1, now) == many.lane(1, now) and one.recent() == many.recent()
            assert one.idle(step, now + 10) == many.idle(step, now + 10)
            assert one.history() == many.history() and one.advance(now) == many.advance(now)
