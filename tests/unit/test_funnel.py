"""Table-driven tests of the pure funnel state machine (no Kafka, no RocksDB, no clock)."""

from __future__ import annotations

import itertools
import json

import pytest

from stream.contract.events import Event, encode_event
from stream.join.funnel import (
    FINAL_SEQ,
    NO_SWEPT,
    NO_WATERMARK,
    FunnelConfig,
    FunnelState,
    Result,
    Swept,
    advance,
    decode_state,
    encode_state,
    final_at,
    is_final,
    labels,
    next_dues,
    sweep,
)

T0 = 1_767_225_600_000
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
CFG = FunnelConfig()
OFFSETS = (0, 1 * MIN, 20 * MIN, 30 * MIN, 2 * DAY)  # impression .. activation


def ev(step: int, t: int, iid: str = "i-1", eid: str | None = None) -> Event:
    return Event(step, eid or f"{iid}/{step}", iid, t, "bank_1", {"f": "v"} if step == 0 else None)


def lanes(v: int | Swept) -> Swept:
    """Every lane at ``v`` (an int), or the five lanes given."""
    return (v, v, v, v, v) if isinstance(v, int) else v


def run(events: list[Event], swept: int | Swept = NO_WATERMARK, cfg: FunnelConfig = CFG):
    state: FunnelState | None = None
    results: list[Result] = []
    for e in events:
        res = advance(state, e, encode_event(e), lanes(swept), cfg)
        results.append(res)
        state = res.state
    return state, results


def finish(state: FunnelState, now: int | Swept, prev: int | Swept = NO_WATERMARK, cfg: FunnelConfig = CFG) -> Result:
    return sweep(state, lanes(prev), lanes(now), cfg)


@pytest.mark.parametrize("order", list(itertools.permutations(range(5))))
def test_every_arrival_order_gives_the_full_funnel(order: tuple[int, ...]) -> None:
    events = [ev(s, T0 + OFFSETS[s]) for s in order]
    state, results = run(events, swept=T0)
    assert state is not None and not state.held
    assert labels(state) == (1, 1, 1, 1)
    assert not [r for res in results for r in res.rejects]
    # activated: final at once, whichever event completed it; nothing left for the sweep
    finals = [s for res in results for s in res.samples if s.kind == "final"]
    assert [(s.labels, s.mature, s.seq) for s in finals] == [((1, 1, 1, 1), (True,) * 4, FINAL_SEQ)]
    assert results[-1].samples[-1].kind == "final"
    assert not [s for s in finish(state, T0 + 3 * DAY, prev=T0).samples if s.kind == "final"]


@pytest.mark.parametrize("order", list(itertools.permutations(range(5)))[::7])
def test_duplicates_are_idempotent_in_any_order(order: tuple[int, ...]) -> None:
    events = [ev(s, T0 + OFFSETS[s]) for s in order]
    once, _ = run(events, swept=T0)
    twice, results = run([e for e in events for _ in (0, 1)], swept=T0)
    assert once == twice
    assert sum(r.duplicate for r in results) == 5


@pytest.mark.parametrize(
    ("steps", "missing", "expected_labels", "reason"),
    [
        ((0, 1, 3), 2, (1, 0, 0, 0), "illegal_sequence"),  # approval with no application
        ((0, 2), 1, (0, 0, 0, 0), "illegal_sequence"),  # application with no click
        # activation with no approval, two days after an application whose approval window (1 d)
        # closed first: it happened after its funnel's final time
        ((0, 1, 2, 4), 3, (1, 1, 0, 0), "late"),
    ],
)
def test_events_after_a_missing_step_give_up(steps, missing, expected_labels, reason) -> None:
    state, results = run([ev(s, T0 + OFFSETS[s]) for s in steps], swept=T0)
    assert state is not None and len(state.held) == 1 and not any(r.rejects for r in results)
    assert all(r.changed for r in results)  # a held event is written, or a restart would lose it
    # held until the missing step's topic is past it by the grace (+ the skew per step missing),
    # or until the funnel is final, whichever first
    held = state.held[0]
    due = min(held.event_time_ms + CFG.grace_ms + (held.step - missing) * CFG.skew_ms, final_at(state, CFG))
    only_lane = tuple(due if lane == missing else T0 for lane in range(5))
    before = tuple(due - 1 if lane == missing else T0 for lane in range(5))
    assert not finish(state, before, prev=T0).rejects
    res = finish(state, only_lane, prev=before)
    assert [r.reason for r in res.rejects] == [reason] and res.changed
    assert labels(res.state) == expected_labels


def test_orphan_event_without_impression_is_illegal_then_purged() -> None:
    state, _ = run([ev(1, T0)], swept=T0 - HOUR)
    assert state is not None and state.is_stub
    res = finish(state, T0 + CFG.grace_ms + CFG.skew_ms)
    assert [r.reason for r in res.rejects] == ["illegal_sequence"] and res.state is None and res.changed


def test_event_for_a_final_funnel_is_late() -> None:
    state, _ = run([ev(0, T0)])
    assert state is not None
    res = advance(state, ev(1, T0 + 10 * MIN), b"raw", lanes(T0 + HOUR), CFG)
    assert [r.reason for r in res.rejects] == ["late"] and not res.changed


def test_unknown_impression_past_grace() -> None:
    # no impression for it, and the impressions' topic is past it: illegal_sequence ...
    _, results = run([ev(1, T0)], swept=T0 + DAY)
    assert [r.reason for r in results[0].rejects] == ["illegal_sequence"]
    # ... unless it is older than the retention: its funnel may have been purged (a replay)
    _, results = run([ev(1, T0)], swept=T0 + CFG.retention_ms)
    assert [r.reason for r in results[0].rejects] == ["late"]


def test_duplicate_of_a_final_funnel_is_not_a_dead_letter() -> None:
    state, _ = run([ev(0, T0), ev(1, T0 + MIN)])
    res = advance(state, ev(1, T0 + MIN), b"raw", lanes(T0 + 10 * DAY), CFG)
    assert res.duplicate and not res.rejects


def test_activation_after_day_14_is_late_and_negative() -> None:
    events = [ev(s, T0 + OFFSETS[s]) for s in range(4)]
    state, _ = run(events, swept=T0)
    approval = T0 + OFFSETS[3]
    res = advance(state, ev(4, approval + 15 * DAY), b"raw", lanes(T0), CFG)  # window not swept yet
    assert [r.reason for r in res.rejects] == ["late"]
    assert final_at(res.state, CFG) == approval + 14 * DAY
    fin = finish(res.state, approval + 14 * DAY, prev=T0)
    assert fin.samples[-1].labels == (1, 1, 1, 0)


def test_activation_on_day_14_counts() -> None:
    state, _ = run([ev(s, T0 + OFFSETS[s]) for s in range(4)], swept=T0)
    approval = T0 + OFFSETS[3]
    res = advance(state, ev(4, approval + 14 * DAY), b"raw", lanes(T0), CFG)
    assert labels(res.state) == (1, 1, 1, 1)


def test_early_policy_first_then_correction_then_final() -> None:
    state, _ = run([ev(0, T0)])
    first = finish(state, T0 + CFG.observe_ms)
    assert [(s.kind, s.seq, s.labels) for s in first.samples] == [("first", 0, (0, 0, 0, 0))]
    assert first.samples[0].mature == (False,) * 4
    swept = T0 + CFG.observe_ms
    res = advance(state, ev(1, T0 + 40 * MIN), b"raw", lanes(swept), CFG)
    assert [(s.kind, s.seq, s.labels) for s in res.samples] == [("correction", 1, (1, 0, 0, 0))]
    assert res.samples[0].mature == (True, False, False, False)
    done = finish(res.state, T0 + 40 * MIN + 3 * DAY, prev=swept)
    assert [(s.kind, s.seq, s.labels) for s in done.samples] == [("final", FINAL_SEQ, (1, 0, 0, 0))]


def test_no_correction_before_the_first_sample() -> None:
    state, _ = run([ev(0, T0), ev(1, T0 + MIN)])
    assert state is not None
    res = finish(state, T0 + CFG.observe_ms)
    assert [(s.kind, s.labels) for s in res.samples] == [("first", (1, 0, 0, 0))]


def test_matured_policy_emits_only_the_final() -> None:
    cfg = FunnelConfig(policy="matured")
    state, results = run([ev(0, T0), ev(1, T0 + MIN)], cfg=cfg)
    assert not any(r.samples for r in results)
    res = finish(state, T0 + 10 * DAY, cfg=cfg)
    assert [s.kind for s in res.samples] == ["final"]


def test_purge_after_retention_and_due_times() -> None:
    state, _ = run([ev(0, T0)])
    # the first sample on the impressions lane, the final on the clicks lane (it waits for clicks)
    assert next_dues(state, NO_SWEPT, CFG) == (T0 + CFG.observe_ms, T0 + HOUR, None, None, None)
    assert next_dues(state, lanes(T0 + CFG.observe_ms), CFG) == (None, T0 + HOUR, None, None, None)
    assert next_dues(state, lanes(T0 + HOUR), CFG) == (None, T0 + HOUR + CFG.retention_ms, None, None, None)
    res = finish(state, T0 + HOUR + CFG.retention_ms, prev=T0 + HOUR)
    assert res.state is None and res.changed and not res.samples


def test_codec_roundtrip_is_compact() -> None:
    state, _ = run([ev(0, T0), ev(2, T0 + 5 * MIN)], swept=T0)
    assert state is not None and state.held
    data = encode_state(state)
    assert decode_state(data) == state
    with pytest.raises(ValueError, match="codec"):
        decode_state(b"\xe9\x00\x00\x00\x00")


def test_codec_reads_version_1_states() -> None:
    import marshal

    from stream.join.funnel import features_json

    state, _ = run([ev(0, T0), ev(1, T0 + MIN)], swept=T0)
    assert state is not None and state.features_json == b'{"f":"v"}'
    v1 = marshal.dumps((1, state.bank_id, state.imp_ms, {"f": "v"}, state.times, ()))
    assert decode_state(v1) == state
    assert features_json({"é": "\"x\""}) == json.dumps({"é": "\"x\""}, separators=(",", ":")).encode()


def test_sample_bytes_is_encode_sample_byte_for_byte() -> None:
    from stream.contract.samples import Sample, encode_sample, parse_sample, sample_bytes
    from stream.join.funnel import features_json

    for feats, iid in (({}, "i-1"), ({"a": "1", "é\n": "\"q\\"}, "i-\u00e9/\"2")):
        for mature in itertools.product((False, True), repeat=4):
            s = Sample(iid, "bank_1", T0, feats, (1, 0, 1, 0), mature, "correction", 7, 2, T0 + 9, "early")  # type: ignore[arg-type]
            got = sample_bytes(iid, "bank_1", T0, features_json(feats), s.labels, s.mature, s.kind, 7, 2, T0 + 9, "early")
            assert got == encode_sample(s)
            assert parse_sample(got) == s


# --- label conservation: finals judged by the missing step's own topic (lanes) ----------------


def lane_at(lane: int, v: int, rest: int = T0) -> Swept:
    return tuple(v if k == lane else rest for k in range(5))  # type: ignore[return-value]


@pytest.mark.parametrize("policy", ["early", "matured"])
@pytest.mark.parametrize(
    ("steps", "late_step", "swept", "want"),
    [
        # activation 5 days after the impression, read when every topic is a week ahead
        ((0, 1, 2, 3), 4, T0 + 7 * DAY, (1, 1, 1, 1)),
        # application at +1 h read 1 d 3 h later: the approvals topic is past its window (1 d)
        ((0, 1), 2, T0 + DAY + 3 * HOUR, (1, 1, 0, 0)),
    ],
)
def test_a_step_that_counts_after_its_new_final_time_emits_the_final_at_once(steps, late_step, swept, want, policy):
    cfg = FunnelConfig(policy=policy)
    times = {0: T0, 1: T0 + MIN, 2: T0 + HOUR, 3: T0 + HOUR + 10 * MIN, 4: T0 + 5 * DAY}
    state, _ = run([ev(s, times[s]) for s in steps], swept=T0, cfg=cfg)
    early = lanes(T0 + CFG.observe_ms)  # the first sample went out
    res = advance(state, ev(late_step, times[late_step]), b"raw", lanes(swept), cfg)
    assert not res.rejects and res.changed
    kinds = [(s.kind, s.labels) for s in res.samples]
    if policy == "early":
        assert first_went_out(state, early)
        assert kinds == [("correction", want), ("final", want)]  # the correction, then the final
    else:
        assert kinds == [("final", want)]
    assert is_final(res.state, lanes(swept), cfg)
    purge = final_at(res.state, cfg) + cfg.retention_ms  # nothing more is due but the purge
    assert [d for d in next_dues(res.state, lanes(swept), cfg) if d is not None] == [purge]
    assert not [s for s in sweep(res.state, lanes(swept), lanes(swept + DAY), cfg).samples]


def first_went_out(state: FunnelState, swept: Swept) -> bool:
    return state.imp_ms + CFG.observe_ms <= swept[0]


def test_the_final_waits_for_the_missing_steps_topic_only() -> None:
    state, _ = run([ev(0, T0), ev(1, T0 + MIN)])  # clicked: waits for applications (lane 2)
    fa = T0 + MIN + 3 * DAY
    assert next_dues(state, NO_SWEPT, CFG)[2] == fa
    # every other topic far ahead: not final
    assert not is_final(state, (T0 + 9 * DAY, T0 + 9 * DAY, fa - 1, T0 + 9 * DAY, T0 + 9 * DAY), CFG)
    res = finish(state, lane_at(2, fa), prev=NO_SWEPT)
    assert [(s.kind, s.labels, s.watermark_ms) for s in res.samples] == [("final", (1, 0, 0, 0), fa)]
    # a clicks topic (lane 1) past the click window matters no more: the click is in
    assert not finish(state, lane_at(1, T0 + 9 * DAY), prev=NO_SWEPT).samples


@pytest.mark.parametrize(
    ("delta", "counts"),
    [(0, True), (-5 * MIN, True), (-5 * MIN - 1, False), (HOUR, True), (HOUR + 1, False)],
)
def test_window_edges_and_clock_skew(delta: int, counts: bool) -> None:
    state, results = run([ev(0, T0), ev(1, T0 + delta)], swept=T0 - DAY)
    assert labels(state) == ((1, 0, 0, 0) if counts else (0, 0, 0, 0))
    want = [] if counts else ["late" if delta > 0 else "illegal_sequence"]
    assert [r.reason for r in results[1].rejects] == want


@pytest.mark.parametrize(
    ("events", "swept", "reason"),
    [
        # a click inside its window arriving after its funnel's final went out (lane 1 past): late
        ([ev(0, T0), ev(1, T0 + 10 * MIN)], lane_at(1, T0 + HOUR), "late"),
        # an application with no click, inside the click window, once the final is out: illegal
        ([ev(0, T0), ev(2, T0 + 10 * MIN)], lane_at(1, T0 + HOUR), "illegal_sequence"),
        # ... and after the click window: it happened after the funnel's final time: late
        ([ev(0, T0), ev(2, T0 + 2 * HOUR)], lane_at(1, T0 + 3 * HOUR), "late"),
        # an application whose click topic is already past it by the grace: gives up at once
        ([ev(0, T0), ev(2, T0 + 10 * MIN)], lane_at(1, T0 + 10 * MIN + CFG.grace_ms + CFG.skew_ms), "illegal_sequence"),
    ],
)
def test_reasons_of_events_that_do_not_count(events: list[Event], swept: Swept, reason: str) -> None:
    state, _ = run(events[:1], swept=T0 - DAY)
    res = advance(state, events[1], b"raw", swept, CFG)
    assert [r.reason for r in res.rejects] == [reason] and not res.changed


def test_an_application_delivered_hours_late_counts_while_its_topic_holds_the_final() -> None:
    """The applications topic runs 3 h behind: the click's funnel waits for it (lane 2), so an
    application stamped 2 days after the click and read 3 h later still counts."""
    state, _ = run([ev(0, T0), ev(1, T0 + MIN)], swept=T0)
    swept = (T0 + 2 * DAY + 3 * HOUR, T0 + 2 * DAY + 3 * HOUR, T0 + 2 * DAY, T0 + 2 * DAY + 3 * HOUR, T0)
    res = advance(state, ev(2, T0 + 2 * DAY), b"raw", swept, CFG)
    assert labels(res.state) == (1, 1, 0, 0) and not res.rejects
    # the approvals topic is 3 h past the application: not final yet (its window is 1 day)
    assert not [s for s in res.samples if s.kind == "final"]


def test_a_late_impression_gets_its_first_and_its_held_events() -> None:
    """Impressions partition stalled: the click came first (held in a stub that waits on the
    impressions' own lane), the impression later. It is accepted and the held click counts."""
    state, _ = run([ev(1, T0 + MIN)], swept=T0 - HOUR)
    assert next_dues(state, lanes(T0 - HOUR), CFG)[0] == T0 + MIN + CFG.grace_ms + CFG.skew_ms
    other_topics_ahead = (T0 + 10 * MIN, T0 + 3 * HOUR, T0 + 3 * HOUR, T0 + 3 * HOUR, T0 + 3 * HOUR)
    res = advance(state, ev(0, T0), b"raw", other_topics_ahead, CFG)
    assert labels(res.state) == (1, 0, 0, 0) and not res.rejects and not res.samples
    # an impression read when its first sample is already due: the first goes out at once
    swept = lanes(T0 + 40 * MIN)
    late, results = run([ev(0, T0)], swept=swept)
    assert [(s.kind, s.labels, s.seq) for s in results[0].samples] == [("first", (0, 0, 0, 0), 0)]
    assert next_dues(late, swept, CFG) == (None, T0 + HOUR, None, None, None)


def test_an_impression_without_click_read_after_its_click_window_is_final_at_once() -> None:
    state, results = run([ev(0, T0)], swept=(T0, T0 + 2 * HOUR, T0, T0, T0))
    assert [(s.kind, s.labels) for s in results[0].samples] == [("final", (0, 0, 0, 0))]
    assert state is not None and is_final(state, (T0, T0 + 2 * HOUR, T0, T0, T0), CFG)


def test_held_events_resolve_when_their_predecessor_comes_late_in_its_window() -> None:
    state, _ = run([ev(0, T0), ev(3, T0 + 30 * MIN), ev(2, T0 + 20 * MIN)], swept=T0)  # click missing
    assert state is not None and len(state.held) == 2
    res = advance(state, ev(1, T0 + MIN), b"raw", lanes(T0), CFG)
    assert labels(res.state) == (1, 1, 1, 0) and not res.state.held and not res.rejects


def test_mature_mask_follows_each_tasks_own_lane() -> None:
    from stream.join.funnel import mature

    state, _ = run([ev(0, T0), ev(1, T0 + MIN)])
    # click positive; application window (3 d after the click) closed on lane 2 only
    assert mature(state, lane_at(2, T0 + MIN + 3 * DAY), CFG) == (True, True, True, True)
    assert mature(state, lane_at(3, T0 + 9 * DAY), CFG) == (True, False, False, False)


def test_an_event_held_for_its_impression_that_arrived_too_late_does_not_count() -> None:
    """Reading a backlog, a click delivered 20 days late can be read before its impression: it is
    held, with its own topic's lane at arrival; when the impression comes, the click counts only
    if that lane was not yet past the click window (the same verdict as live reading)."""
    late_lanes = lanes(T0 - DAY)[:1] + (T0 + 20 * DAY,) * 4
    state, _ = run([ev(1, T0 + MIN)], swept=late_lanes)  # type: ignore[arg-type]
    assert state is not None and state.held[0].lane_ms == T0 + 20 * DAY
    res = advance(state, ev(0, T0), b"raw", lanes(T0 - DAY), CFG)
    assert [r.reason for r in res.rejects] == ["late"] and labels(res.state) == (0, 0, 0, 0)
    in_time, _ = run([ev(1, T0 + MIN)], swept=lanes(T0 - DAY))
    res = advance(in_time, ev(0, T0), b"raw", lanes(T0 - DAY), CFG)
    assert not res.rejects and labels(res.state) == (1, 0, 0, 0)


def test_codec_reads_version_2_states_and_keeps_the_arrival_lane() -> None:
    import marshal

    state, _ = run([ev(0, T0), ev(2, T0 + 5 * MIN)], swept=T0)
    assert state is not None and state.held[0].lane_ms == T0
    assert decode_state(encode_state(state)) == state
    h = state.held[0]
    v2 = marshal.dumps((2, state.bank_id, state.imp_ms, state.features_json, state.times,
                        ((h.step, h.event_time_ms, h.event_id, h.raw),)))  # fmt: skip
    old = decode_state(v2)
    assert old.held[0].lane_ms == NO_WATERMARK and old.held[0].raw == h.raw and old.times == state.times


@pytest.mark.parametrize(
    ("step", "missing", "due"),
    [
        (1, 0, T0 + CFG.grace_ms + CFG.skew_ms),  # a click waiting for its impression
        (2, 1, T0 + CFG.grace_ms + CFG.skew_ms),  # an application waiting for its click
        # an activation waiting for its click: the click, application and approval may each be
        # stamped up to the skew after the step that follows them
        (4, 1, T0 + CFG.grace_ms + 3 * CFG.skew_ms),
        (4, 0, T0 + CFG.grace_ms + 4 * CFG.skew_ms),
    ],
)
def test_a_held_event_waits_the_grace_plus_the_skew_per_missing_step(step: int, missing: int, due: int) -> None:
    from stream.join.funnel import Held, hold_due

    assert hold_due(Held(step, T0, "e", b"raw"), missing, CFG) == due
