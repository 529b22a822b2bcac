"""The funnel state machine's whole answer, compared exactly: the state written (and whether it
is written: ``changed``), each sample, each reject with its reason, step, raw record and sentence.
Every expected value is written by hand from the rules in ``stream/join/funnel.py``'s module doc
(windows: click 1 h, application 3 d, approval 1 d, activation 14 d; grace 10 min + 5 min skew per
missing step; first sample 30 min after the impression; retention 27 d). Lanes are given
distinct values so that a rule that reads the wrong topic's lane shows."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest

from stream.contract.events import Event, encode_event
from stream.join.funnel import (
    NO_SWEPT,
    NO_WATERMARK,
    FunnelConfig,
    FunnelState,
    Held,
    Reject,
    Result,
    SampleOut,
    advance,
    decode_state,
    features_json,
    final_lane,
    is_final,
    next_dues,
    reached,
    sweep,
)

T0 = 1_767_225_600_000
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
RET = 27 * DAY
NW = NO_WATERMARK
CFG = FunnelConfig()
FEATS = b'{"f":"v"}'
F4 = (False, False, False, False)
T4 = (True, True, True, True)


def ev(step: int, t: int, bank: str = "bank_1") -> Event:
    return Event(step, f"i-1/{step}", "i-1", t, bank, {"f": "v"} if step == 0 else None)


def raw(step: int, t: int, bank: str = "bank_1") -> bytes:
    return encode_event(ev(step, t, bank))


def go(state: FunnelState | None, step: int, t: int, swept: tuple[int, int, int, int, int] = NO_SWEPT,
       bank: str = "bank_1") -> Result:
    return advance(state, ev(step, t, bank), raw(step, t, bank), swept, CFG)


IMP = FunnelState("bank_1", T0, FEATS)  # an impression, nothing else yet
CLICKED = FunnelState("bank_1", T0, FEATS, (T0 + MIN, -1, -1, -1))  # ... and its click a minute later


def test_an_impression_older_than_the_retention_period_is_late() -> None:
    swept = (T0 + RET, NW, NW, NW, NW)
    late = Reject("late", 0, raw(0, T0), "impression older than the retention period")
    assert go(None, 0, T0, swept) == Result(None, rejects=[late])
    assert go(None, 0, T0 + 1, swept).state == IMP.__class__("bank_1", T0 + 1, FEATS)  # one ms younger
    stub = FunnelState("bank_1", -1, None, held=(Held(1, T0 + MIN, "i-1/1", b"c", NW),))
    assert go(stub, 0, T0, swept) == Result(stub, rejects=[late])  # the held click stays held


def test_a_stub_holds_each_event_and_is_written_each_time_then_the_impression_applies_them() -> None:
    swept = (NW, 7, 8, 9, 10)
    h1 = Held(1, T0 + MIN, "i-1/1", raw(1, T0 + MIN), 7)  # arrival lane: its own topic's
    r1 = go(None, 1, T0 + MIN, swept)
    assert r1 == Result(FunnelState("bank_1", -1, None, held=(h1,)), changed=True)
    h2 = Held(2, T0 + 2 * MIN, "i-1/2", raw(2, T0 + 2 * MIN), 8)
    r2 = go(r1.state, 2, T0 + 2 * MIN, swept)
    assert r2 == Result(FunnelState("bank_1", -1, None, held=(h1, h2)), changed=True)  # written: not lost
    assert go(r2.state, 2, T0 + 3 * MIN, swept) == Result(r2.state, duplicate=True)
    # the impression (of another bank's record) 40 min of impressions later: its first sample at once
    r3 = go(r2.state, 0, T0, (T0 + 40 * MIN, 7, 8, 9, 10), bank="bank_9")
    first = SampleOut("first", 0, (1, 1, 0, 0), (True, True, False, False), 40 * MIN, T0 + 40 * MIN)
    assert r3 == Result(FunnelState("bank_9", T0, FEATS, (T0 + MIN, T0 + 2 * MIN, -1, -1)), changed=True,
                        samples=[first])


def test_events_of_an_impression_that_never_came() -> None:
    # a click at T0 gives up at T0 + 10 min grace + 5 min skew on the impressions lane
    assert go(None, 1, T0, (T0 + 15 * MIN - 1, NW, NW, NW, NW)).changed
    assert go(None, 1, T0, (T0 + 15 * MIN, NW, NW, NW, NW)) == Result(None, rejects=[
        Reject("illegal_sequence", 1, raw(1, T0), "no impression for this click within the grace period")])
    assert go(None, 1, T0, (T0 + RET, NW, NW, NW, NW)) == Result(None, rejects=[
        Reject("late", 1, raw(1, T0), "click for an unknown impression older than the retention period")])
    stub = go(None, 1, T0 + MIN).state
    assert stub is not None
    # an application: 10 min + 2 x 5 min
    assert go(stub, 2, T0, (T0 + 20 * MIN - 1, NW, NW, NW, NW)).changed
    assert go(stub, 2, T0, (T0 + 20 * MIN, NW, NW, NW, NW)) == Result(stub, rejects=[
        Reject("illegal_sequence", 2, raw(2, T0), "no impression for this application within the grace period")])
    assert go(stub, 2, T0, (T0 + RET, NW, NW, NW, NW)) == Result(stub, rejects=[
        Reject("late", 2, raw(2, T0), "application for an unknown impression older than the retention period")])


def test_the_reasons_given_for_a_step_that_does_not_count() -> None:
    pred = T0 + MIN  # the click
    t = pred - 5 * MIN - 1  # more than the skew before its click
    assert go(CLICKED, 2, t) == Result(CLICKED, rejects=[
        Reject("illegal_sequence", 2, raw(2, t), "application is older than its click")])
    assert go(CLICKED, 2, pred - 5 * MIN).state.times[1] == pred - 5 * MIN  # type: ignore[union-attr]
    t = pred + 3 * DAY + 1
    assert go(CLICKED, 2, t) == Result(CLICKED, rejects=[
        Reject("late", 2, raw(2, t), "application came after its 259200000 ms window")])
    assert go(CLICKED, 2, pred + 3 * DAY).state.times[1] == pred + 3 * DAY  # type: ignore[union-attr]
    final = (NW, NW, pred + 3 * DAY, NW, NW)  # the applications topic reached the final time
    assert go(CLICKED, 2, pred + MIN, final) == Result(CLICKED, rejects=[
        Reject("late", 2, raw(2, pred + MIN), "application arrived after its funnel's final (beyond the allowed lateness)")])
    assert go(CLICKED, 3, t, final) == Result(CLICKED, rejects=[
        Reject("late", 3, raw(3, t), "approval happened after its funnel's final time (no application in time)")])
    # an approval without application gives up once the applications lane is 10 + 5 min past it
    t = T0 + 2 * MIN
    held = go(CLICKED, 3, t, (NW, NW, t + 15 * MIN - 1, NW, NW))
    assert held == Result(replace(CLICKED, held=(Held(3, t, "i-1/3", raw(3, t), NW),)), changed=True)
    assert go(CLICKED, 3, t, (NW, NW, t + 15 * MIN, NW, NW)) == Result(CLICKED, rejects=[
        Reject("illegal_sequence", 3, raw(3, t), "no application before this approval")])


def test_a_held_event_that_arrived_once_its_lane_was_at_the_final_does_not_count() -> None:
    fa = T0 + MIN + 3 * DAY  # the application window's end, once the click is there
    held = go(IMP, 2, T0 + 2 * MIN, (NW, NW, fa, NW, NW))  # held: no click yet
    h = Held(2, T0 + 2 * MIN, "i-1/2", raw(2, T0 + 2 * MIN), fa)
    assert held == Result(replace(IMP, held=(h,)), changed=True)
    res = go(held.state, 1, T0 + MIN)
    assert res == Result(CLICKED, changed=True, rejects=[
        Reject("late", 2, h.raw, "application arrived after its funnel's final (beyond the allowed lateness)")])
    h_in_time = replace(h, lane_ms=fa - 1)
    res = go(replace(IMP, held=(h_in_time,)), 1, T0 + MIN)
    assert res.state is not None and res.state.times[:2] == (T0 + MIN, T0 + 2 * MIN) and res.rejects == []


def test_held_events_whose_lane_passed_them_are_rejected_when_their_funnel_moves_on() -> None:
    t = T0 + 5 * MIN
    h = Held(3, t, "i-1/3", raw(3, t), NW)  # an approval waiting for its click and application
    state = replace(IMP, held=(h,))
    # the click comes; the approval now waits for the applications lane: gives up at t + 10 + 5 min
    res = go(state, 1, T0 + MIN, (NW, NW, t + 15 * MIN, NW, NW))
    assert res == Result(CLICKED, changed=True, rejects=[
        Reject("illegal_sequence", 3, h.raw, "no application before this approval")])
    res = go(state, 1, T0 + MIN, (NW, NW, t + 15 * MIN - 1, NW, NW))
    assert res == Result(replace(CLICKED, held=(h,)), changed=True)


def test_the_final_rejects_what_is_still_held_and_carries_its_lanes_watermark() -> None:
    h = Held(2, T0 + 10 * MIN, "i-1/2", raw(2, T0 + 10 * MIN), NW)
    state = replace(IMP, held=(h,))
    res = sweep(state, NO_SWEPT, (T0 + 2 * HOUR, T0 + HOUR + 7, 1, 2, 3), CFG)
    final = SampleOut("final", 5, (0, 0, 0, 0), T4, HOUR, T0 + HOUR + 7)
    assert res == Result(IMP, changed=True, samples=[final], rejects=[
        Reject("illegal_sequence", 2, h.raw, "no click before this application")])


def test_a_sweep_gives_up_on_held_events_by_their_missing_steps_lane() -> None:
    h = Held(2, T0 + 10 * MIN, "i-1/2", raw(2, T0 + 10 * MIN), NW)
    state = replace(IMP, held=(h,))
    # the clicks lane 10 + 5 min past the application; not final yet (click window: 1 h)
    res = sweep(state, NO_SWEPT, (T0 + 20 * MIN, T0 + 25 * MIN, 10**15, 10**15, 10**15), CFG)
    assert res == Result(IMP, changed=True, rejects=[
        Reject("illegal_sequence", 2, h.raw, "no click before this application")])
    assert sweep(state, NO_SWEPT, (T0 + 20 * MIN, T0 + 25 * MIN - 1, 10**15, 10**15, 10**15), CFG) == Result(state)


def test_a_sweep_gives_up_on_a_stubs_events_one_by_one_then_deletes_it() -> None:
    h1 = Held(1, T0 + MIN, "i-1/1", raw(1, T0 + MIN), NW)  # gives up at T0 + 16 min
    h2 = Held(2, T0 + 2 * MIN, "i-1/2", raw(2, T0 + 2 * MIN), NW)  # at T0 + 22 min
    stub = FunnelState("bank_1", -1, None, held=(h1, h2))
    far = 10**15
    res = sweep(stub, NO_SWEPT, (T0 + 16 * MIN, far, far, far, far), CFG)
    assert res == Result(replace(stub, held=(h2,)), changed=True, rejects=[
        Reject("illegal_sequence", 1, h1.raw, "no impression for this click within the grace period")])
    res = sweep(stub, NO_SWEPT, (T0 + 22 * MIN, far, far, far, far), CFG)
    assert res == Result(None, changed=True, rejects=[
        Reject("illegal_sequence", 1, h1.raw, "no impression for this click within the grace period"),
        Reject("illegal_sequence", 2, h2.raw, "no impression for this application within the grace period")])
    assert sweep(stub, NO_SWEPT, (T0 + 16 * MIN - 1, far, far, far, far), CFG) == Result(stub)


def test_first_sample_exactly_at_its_time_and_a_correction_after_it() -> None:
    res = go(None, 0, T0, (T0 + 30 * MIN, 1, 2, 3, 4))
    assert res == Result(IMP, changed=True, samples=[SampleOut("first", 0, (0, 0, 0, 0), F4, 30 * MIN, T0 + 30 * MIN)])
    assert go(None, 0, T0, (T0 + 30 * MIN - 1, 1, 2, 3, 4)) == Result(IMP, changed=True)
    # the click after the first sample went out: a correction (seq 1) stamped at the click
    res = go(IMP, 1, T0 + MIN, (T0 + 40 * MIN, 5, 6, 7, 8))
    corr = SampleOut("correction", 1, (1, 0, 0, 0), (True, False, False, False), MIN, T0 + 40 * MIN)
    assert res == Result(CLICKED, changed=True, samples=[corr])
    assert go(IMP, 1, T0 + MIN, (T0 + 30 * MIN - 1, T0 + 59 * MIN, 5, 6, 7)) == Result(CLICKED, changed=True)


def test_a_first_sample_by_sweep_and_a_funnel_complete_at_its_impression_time() -> None:
    res = sweep(IMP, (T0 + 30 * MIN - 1, 1, 2, 3, 4), (T0 + 30 * MIN, 5, 6, 7, 8), CFG)
    assert res == Result(IMP, samples=[SampleOut("first", 0, (0, 0, 0, 0), F4, 30 * MIN, T0 + 30 * MIN)])
    assert sweep(IMP, (T0 + 30 * MIN, 1, 2, 3, 4), (T0 + 31 * MIN, 5, 6, 7, 8), CFG) == Result(IMP)  # once
    state = IMP
    for step in range(1, 5):
        res = go(state, step, T0)
        state = res.state  # type: ignore[assignment]
    assert res.samples == [SampleOut("final", 5, (1, 1, 1, 1), T4, 0, NW)]  # activated: final at once


def test_documented_values_for_a_stub() -> None:
    stub = FunnelState("bank_1", -1, None, held=(Held(1, T0, "i-1/1", b"c", NW),))
    assert reached(stub) == -1  # "-1 for a stub"
    assert final_lane(stub) == 0  # a stub waits for its impression
    assert not is_final(stub, (10**15,) * 5, CFG)  # a stub is never final
    assert final_lane(replace(IMP, times=(T0, T0, T0, T0))) == 0  # activated: final at once


def test_an_unknown_codec_version_is_refused_clearly() -> None:
    import marshal

    bad = marshal.dumps((9, "bank_1", T0, None, (-1, -1, -1, -1), ()))  # six fields, version 9
    with pytest.raises(ValueError, match=r"^funnel state was written by an unknown codec version; clear the store$"):
        decode_state(bad)
    with pytest.raises(ValueError, match="unknown codec version"):
        decode_state(b"\x00garbage")


def test_features_of_any_mapping_encode_as_compact_json() -> None:
    assert features_json({"b": "2", "a": "1"}) == b'{"b":"2","a":"1"}'
    assert features_json(MappingProxyType({"a": "1"})) == b'{"a":"1"}'
    assert features_json(None) == b"{}"
    assert features_json(MappingProxyType({})) == b"{}"


def test_the_final_of_an_activated_funnel_carries_the_impressions_lane() -> None:
    state = replace(IMP, times=(T0 + 1, T0 + 2, T0 + 3, -1))
    res = go(state, 4, T0 + 4, (T0 + 5 * MIN, 11, 12, 13, 14))
    assert res.samples == [SampleOut("final", 5, (1, 1, 1, 1), T4, 4, T0 + 5 * MIN)]


def test_a_correction_carries_each_tasks_maturity() -> None:
    state = replace(IMP, times=(T0 + MIN, T0 + 2 * MIN, -1, -1))
    res = go(state, 3, T0 + 3 * MIN, (T0 + 40 * MIN, 1, 2, 3, 4))  # the first went out: a correction
    assert res.samples == [SampleOut("correction", 3, (1, 1, 1, 0), (True, True, True, False), 3 * MIN, T0 + 40 * MIN)]


def test_the_matured_policy_never_sends_a_first_sample() -> None:
    cfg = FunnelConfig(policy="matured")
    res = advance(None, ev(0, T0), raw(0, T0), (T0 + 40 * MIN, NW, NW, NW, NW), cfg)
    assert res == Result(IMP, changed=True)


def test_no_first_sample_when_it_would_be_due_at_the_final_time() -> None:
    cfg = FunnelConfig(observe_ms=HOUR)  # the first would be due when the click window closes
    res = advance(None, ev(0, T0), raw(0, T0), (T0 + 2 * HOUR, T0 + 10 * MIN, NW, NW, NW), cfg)
    assert res == Result(IMP, changed=True)  # not final yet (clicks lane at 10 min), and no first
    assert next_dues(IMP, NO_SWEPT, cfg) == (None, T0 + HOUR, None, None, None)
    res = sweep(IMP, (T0, T0, NW, NW, NW), (T0 + 2 * HOUR, T0 + 10 * MIN, NW, NW, NW), cfg)
    assert res == Result(IMP)


def test_the_next_due_time_of_a_funnel_with_a_held_event() -> None:
    h = Held(2, T0 + 10 * MIN, "i-1/2", b"a", NW)  # gives up on its click at T0 + 25 min
    state = replace(IMP, held=(h,))
    assert next_dues(state, NO_SWEPT, CFG) == (T0 + 30 * MIN, T0 + 25 * MIN, None, None, None)
    # the clicks lane already at the give-up time: the next work on it is the final
    assert next_dues(state, (NW, T0 + 25 * MIN, NW, NW, NW), CFG) == (T0 + 30 * MIN, T0 + HOUR, None, None, None)


def test_held_events_rejected_at_the_final_in_the_order_they_came() -> None:
    h_app = Held(2, T0 + 50 * MIN, "i-1/2", raw(2, T0 + 50 * MIN), NW)  # would give up at 65 min
    h_apr = Held(3, T0 + 5 * MIN, "i-1/3", raw(3, T0 + 5 * MIN), NW)  # would give up at 25 min
    res = sweep(replace(IMP, held=(h_app, h_apr)), (T0 + 31 * MIN, NW, NW, NW, NW),
                (T0 + 31 * MIN, T0 + HOUR, NW, NW, NW), CFG)
    assert [(r.step, r.detail) for r in res.rejects] == [
        (2, "no click before this application"), (3, "no application before this approval")]


def test_reasons_at_the_exact_edges() -> None:
    pred = T0 + MIN  # the click
    fa = pred + 3 * DAY  # the application window's end
    # a held application exactly at the skew edge / the window edge, arrived once its lane was at
    # the final: it counts by time, so the reason is its late arrival
    for t in (pred - 5 * MIN, fa):
        h = Held(2, t, "i-1/2", raw(2, t), fa)
        res = go(replace(IMP, held=(h,)), 1, pred)
        assert res.rejects == [Reject("late", 2, h.raw, "application arrived after its funnel's final (beyond the allowed lateness)")]
    # an approval exactly at the final time, without application: not after it
    res = go(CLICKED, 3, fa, (NW, NW, fa + 15 * MIN, NW, NW))
    assert res.rejects == [Reject("illegal_sequence", 3, raw(3, fa), "no application before this approval")]
