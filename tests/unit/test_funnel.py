"""Table-driven tests of the pure funnel state machine (no Kafka, no RocksDB, no clock)."""

from __future__ import annotations

import itertools
import json

import pytest

from stream.events import Event, encode_event
from stream.funnel import (
    FINAL_SEQ,
    NO_WATERMARK,
    FunnelConfig,
    FunnelState,
    Result,
    advance,
    decode_state,
    encode_state,
    final_at,
    labels,
    next_due,
    sweep,
)

T0 = 1_767_225_600_000
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
CFG = FunnelConfig()
OFFSETS = (0, 1 * MIN, 20 * MIN, 30 * MIN, 2 * DAY)  # impression .. activation


def ev(step: int, t: int, iid: str = "i-1", eid: str | None = None) -> Event:
    return Event(step, eid or f"{iid}/{step}", iid, t, "bank_1", {"f": "v"} if step == 0 else None)


def run(events: list[Event], wm: int = NO_WATERMARK, swept: int = NO_WATERMARK, cfg: FunnelConfig = CFG):
    state: FunnelState | None = None
    results: list[Result] = []
    for e in events:
        res = advance(state, e, encode_event(e), wm, swept, cfg)
        results.append(res)
        state = res.state
    return state, results


def finish(state: FunnelState, wm: int, prev: int = NO_WATERMARK, cfg: FunnelConfig = CFG) -> Result:
    return sweep(state, prev, wm, cfg)


@pytest.mark.parametrize("order", list(itertools.permutations(range(5))))
def test_every_arrival_order_gives_the_full_funnel(order: tuple[int, ...]) -> None:
    events = [ev(s, T0 + OFFSETS[s]) for s in order]
    state, results = run(events, wm=T0)
    assert state is not None and not state.held
    assert labels(state) == (1, 1, 1, 1)
    assert not [r for res in results for r in res.rejects]
    res = finish(state, T0 + 3 * DAY)
    assert [s.kind for s in res.samples] == ["final"]
    assert res.samples[0].labels == (1, 1, 1, 1) and res.samples[0].mature == (True,) * 4


@pytest.mark.parametrize("order", list(itertools.permutations(range(5)))[::7])
def test_duplicates_are_idempotent_in_any_order(order: tuple[int, ...]) -> None:
    events = [ev(s, T0 + OFFSETS[s]) for s in order]
    once, _ = run(events, wm=T0)
    twice, results = run([e for e in events for _ in (0, 1)], wm=T0)
    assert once == twice
    assert sum(r.duplicate for r in results) == 5


@pytest.mark.parametrize(
    ("steps", "missing", "expected_labels"),
    [
        ((0, 1, 3), 2, (1, 0, 0, 0)),  # approval with no application
        ((0, 2), 1, (0, 0, 0, 0)),  # application with no click
        ((0, 1, 2, 4), 3, (1, 1, 0, 0)),  # activation with no approval
    ],
)
def test_illegal_sequences_are_dead_lettered_after_grace(steps, missing, expected_labels) -> None:
    state, results = run([ev(s, T0 + OFFSETS[s]) for s in steps], wm=T0)
    assert state is not None and len(state.held) == 1 and not any(r.rejects for r in results)
    res = finish(state, T0 + OFFSETS[missing + 1] + CFG.grace_ms)
    assert [r.reason for r in res.rejects] == ["illegal_sequence"]
    assert labels(res.state) == expected_labels


def test_orphan_event_without_impression_is_illegal_then_purged() -> None:
    state, _ = run([ev(1, T0)], wm=T0 - HOUR)
    assert state is not None and state.is_stub
    res = finish(state, T0 + CFG.grace_ms)
    assert [r.reason for r in res.rejects] == ["illegal_sequence"] and res.state is None and res.changed


def test_event_for_a_final_funnel_is_late() -> None:
    state, _ = run([ev(0, T0)])
    assert state is not None
    res = advance(state, ev(1, T0 + 10 * MIN), b"raw", T0 + HOUR, T0 + HOUR, CFG)
    assert [r.reason for r in res.rejects] == ["late"] and not res.changed


def test_late_click_for_unknown_impression_is_late() -> None:
    _, results = run([ev(1, T0)], wm=T0 + DAY)
    assert [r.reason for r in results[0].rejects] == ["late"]


def test_duplicate_of_a_final_funnel_is_not_a_dead_letter() -> None:
    state, _ = run([ev(0, T0), ev(1, T0 + MIN)])
    res = advance(state, ev(1, T0 + MIN), b"raw", T0 + 10 * DAY, T0 + 10 * DAY, CFG)
    assert res.duplicate and not res.rejects


def test_activation_after_day_14_is_late_and_negative() -> None:
    events = [ev(s, T0 + OFFSETS[s]) for s in range(4)]
    state, _ = run(events, wm=T0)
    approval = T0 + OFFSETS[3]
    res = advance(state, ev(4, approval + 15 * DAY), b"raw", T0, T0, CFG)  # window not swept yet
    assert [r.reason for r in res.rejects] == ["late"]
    assert final_at(res.state, CFG) == approval + 14 * DAY
    fin = finish(res.state, approval + 14 * DAY)
    assert fin.samples[-1].labels == (1, 1, 1, 0)


def test_activation_on_day_14_counts() -> None:
    state, _ = run([ev(s, T0 + OFFSETS[s]) for s in range(4)], wm=T0)
    approval = T0 + OFFSETS[3]
    res = advance(state, ev(4, approval + 14 * DAY), b"raw", T0, T0, CFG)
    assert labels(res.state) == (1, 1, 1, 1)


def test_early_policy_first_then_correction_then_final() -> None:
    state, _ = run([ev(0, T0)])
    first = finish(state, T0 + CFG.observe_ms)
    assert [(s.kind, s.seq, s.labels) for s in first.samples] == [("first", 0, (0, 0, 0, 0))]
    assert first.samples[0].mature == (False,) * 4
    swept = T0 + CFG.observe_ms
    res = advance(state, ev(1, T0 + 40 * MIN), b"raw", swept, swept, CFG)
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
    assert next_due(state, NO_WATERMARK, CFG) == T0 + CFG.observe_ms
    assert next_due(state, T0 + CFG.observe_ms, CFG) == T0 + HOUR
    assert next_due(state, T0 + HOUR, CFG) == T0 + HOUR + CFG.retention_ms
    res = finish(state, T0 + HOUR + CFG.retention_ms, prev=T0 + HOUR)
    assert res.state is None and res.changed and not res.samples


def test_codec_roundtrip_is_compact() -> None:
    state, _ = run([ev(0, T0), ev(2, T0 + 5 * MIN)], wm=T0)
    assert state is not None and state.held
    data = encode_state(state)
    assert decode_state(data) == state
    with pytest.raises(ValueError, match="codec"):
        decode_state(b"\xe9\x00\x00\x00\x00")


def test_codec_reads_version_1_states() -> None:
    import marshal

    from stream.funnel import features_json

    state, _ = run([ev(0, T0), ev(1, T0 + MIN)], wm=T0)
    assert state is not None and state.features_json == b'{"f":"v"}'
    v1 = marshal.dumps((1, state.bank_id, state.imp_ms, {"f": "v"}, state.times, ()))
    assert decode_state(v1) == state
    assert features_json({"é": "\"x\""}) == json.dumps({"é": "\"x\""}, separators=(",", ":")).encode()


def test_sample_bytes_is_encode_sample_byte_for_byte() -> None:
    from stream.funnel import features_json
    from stream.samples import Sample, encode_sample, parse_sample, sample_bytes

    for feats, iid in (({}, "i-1"), ({"a": "1", "é\n": "\"q\\"}, "i-\u00e9/\"2")):
        for mature in itertools.product((False, True), repeat=4):
            s = Sample(iid, "bank_1", T0, feats, (1, 0, 1, 0), mature, "correction", 7, 2, T0 + 9, "early")  # type: ignore[arg-type]
            got = sample_bytes(iid, "bank_1", T0, features_json(feats), s.labels, s.mature, s.kind, 7, 2, T0 + 9, "early")
            assert got == encode_sample(s)
            assert parse_sample(got) == s
