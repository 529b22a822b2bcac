"""Delivery profiles of the simulator and the answer key they come with (simulators/rules.py)."""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from simulators.delivery import PROFILES, profile
from simulators.faults import FaultConfig, SimulatedStream
from simulators.funnel import DAY_MS, EPOCH_MS, HOUR_MS, FunnelSimulator, SimConfig
from simulators.rules import ILLEGAL_SEQUENCE, LATE, Delivered, JoinRules, outcome
from stream.contract.events import STEPS, parse_event

MIN = 60_000
T0 = EPOCH_MS + 3 * DAY_MS


@pytest.fixture(scope="module")
def sim() -> FunnelSimulator:
    return FunnelSimulator(SimConfig(seed=5, impressions_per_day=4000))


def _stream(sim: FunnelSimulator, delivery: str, **kw: object) -> tuple[SimulatedStream, list]:
    stream = SimulatedStream(sim, 2, tail_days=1, delivery=delivery, **kw)  # type: ignore[arg-type]
    return stream, list(stream)


def _bank(rec) -> int:  # type: ignore[no-untyped-def]
    return int(json.loads(rec.value)["bank_id"].split("_")[1])


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_delivers_in_order_with_valid_records(sim: FunnelSimulator, name: str) -> None:
    stream, recs = _stream(sim, name)
    assert all(a.deliver_ms <= b.deliver_ms for a, b in itertools.pairwise(recs))
    for rec in recs:
        ev = parse_event(rec.value, rec.step)
        assert ev.event_time_ms == rec.timestamp_ms
    assert Counter(r.step for r in recs)["impression"] == 2 * 4000 + 200
    assert stream.truth and all(t.final_labels is not None for t in stream.truth)


def test_realtime_is_what_it_was_and_its_answer_key_is_the_world(sim: FunnelSimulator) -> None:
    stream, recs = _stream(sim, "realtime")
    assert all(0 <= r.deliver_ms - r.timestamp_ms < 500 for r in recs)
    for t in stream.truth:
        assert t.final_labels == t.labels  # no fault, no skew: the joiner sees the world as it is


def test_batch_feeds_files_per_bank(sim: FunnelSimulator) -> None:
    stream, recs = _stream(sim, "batch-feeds")
    approvals = [r for r in recs if r.step == "approval"]
    activations = [r for r in recs if r.step == "activation"]
    assert approvals and activations
    files: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    for r in approvals:
        bank = _bank(r)
        hour_end = (r.timestamp_ms // HOUR_MS + 1) * HOUR_MS
        # the previous hour's approvals, exported at minute 5 + 9 x bank (a file: within 1 s)
        assert 0 <= r.deliver_ms - (hour_end + (5 + 9 * bank) * MIN) < 1000
        files["approval", bank, hour_end].append(r.timestamp_ms)
    for r in activations:
        bank = _bank(r)
        day_end = (r.timestamp_ms // DAY_MS + 1) * DAY_MS
        # the previous calendar day's activations, in one file at 02:00 + 2 min x bank
        assert 0 <= r.deliver_ms - (day_end + 2 * HOUR_MS + 2 * bank * MIN) < 1000
        assert r.deliver_ms - r.timestamp_ms <= 26 * HOUR_MS + 11 * MIN
        files["activation", bank, day_end].append(r.timestamp_ms)
    assert all(times == sorted(times) for times in files.values())  # each file in event-time order
    assert max(len(v) for k, v in files.items() if k[0] == "activation") > 1
    others = [r for r in recs if r.step in ("impression", "click", "application")]
    assert all(r.deliver_ms - r.timestamp_ms < 500 for r in others)
    # the delays stay within the joiner's default allowed lateness: the answer key is the world's
    rules = JoinRules()
    assert profile("batch-feeds").max_delay_ms(3) < rules.lateness_ms[3]
    assert profile("batch-feeds").max_delay_ms(4) < rules.lateness_ms[4]
    assert all(t.final_labels == t.labels for t in stream.truth)


def test_lagging_topic_stall_and_skewed_bank_clocks(sim: FunnelSimulator) -> None:
    from simulators.faults import kafka_partition

    stream, recs = _stream(sim, "lagging")
    skew = profile("lagging").bank_skew_ms
    by_id = {}
    for r in recs:
        by_id[r.key, r.step] = r
    true_times = {}  # what really happened, from the unskewed realtime stream of the same world
    for r in SimulatedStream(sim, 2, tail_days=1):
        true_times[r.key, r.step] = r.timestamp_ms
    stalled = 0
    for (key, step), r in by_id.items():
        true = true_times[key, step]
        bank = _bank(r)
        if step in ("application", "approval", "activation"):
            assert r.timestamp_ms == true + skew[bank]  # the bank's clock is off
        else:
            assert r.timestamp_ms == true
        if step == "application":
            assert 3 * HOUR_MS <= r.deliver_ms - true < 3 * HOUR_MS + 500  # three hours behind
        if step == "impression":
            day = true // DAY_MS
            begin, end = day * DAY_MS + 10 * HOUR_MS, day * DAY_MS + 13 * HOUR_MS
            if kafka_partition(key, 4) == day % 4 and begin <= true < end - 500:
                stalled += 1
                assert end <= r.deliver_ms  # held until the stall ends
            elif not begin - 500 <= true < end:
                assert r.deliver_ms - true < 500
    assert stalled > 50
    # a bank whose clock is 7 min behind stamps some applications over 5 min before their click:
    # the rules make those illegal_sequence; applications up to 5 min early still count
    # (and a skewed clock can move a step across its window's edge): the answer key follows the
    # stamps, as the joiner must; banks with a right clock keep the world's labels
    differ = [t for t in stream.truth if t.final_labels is not None and t.final_labels != t.labels]
    assert differ and all(skew[int(t.bank_id.split("_")[1])] != 0 for t in differ)
    illegal = {d.impression_id for d in stream.dead_letters if (d.step, d.reason) == ("application", ILLEGAL_SEQUENCE)}
    assert illegal and illegal <= {t.impression_id for t in differ if t.bank_id == "bank_4"}


def test_truth_lists_every_dead_letter_and_the_finals(sim: FunnelSimulator) -> None:
    faults = FaultConfig.uniform(0.02)
    stream = SimulatedStream(sim, 1, faults, tail_days=21, delivery="batch-feeds")
    recs = list(stream)
    dead = Counter(d.reason for d in stream.dead_letters)
    kinds = Counter(f.kind for f in stream.faults)
    assert dead["late"] >= kinds["late"] > 0 and dead["illegal_sequence"] >= kinds["illegal"] > 0
    parse = sum(n for r, n in dead.items() if r not in ("late", "illegal_sequence"))
    assert parse == kinds["malformed"]  # one dead letter per broken record
    # a late fault is delivered 20 days after it happened, after its funnel's final
    for f in stream.faults:
        if f.kind == "late":
            assert f.expected_reason == LATE
    assert all(d.required for d in stream.dead_letters if d.cause == "late")
    assert {r.key.decode() for r in recs} >= {t.impression_id for t in stream.truth}
    # the main day matures inside the stream: every final of it is required
    assert all(t.final_required for t in stream.truth if not t.tail and t.final_labels is not None)


# --- the rules themselves: hand-written expectations from the README's rules -----------------


def _o(*recs: Delivered, rules: JoinRules | None = None):  # type: ignore[no-untyped-def]
    return outcome(list(recs), rules)


def test_rules_count_in_window_steps_and_time_the_final() -> None:
    out = _o(Delivered(0, T0, T0), Delivered(1, T0 + 5 * MIN, T0), Delivered(2, T0 + HOUR_MS, T0))
    assert out.labels == (1, 1, 0, 0) and out.fates == (None, None, None)
    assert out.final_at_ms == T0 + HOUR_MS + DAY_MS and out.lane == 3  # waits for approvals
    full = _o(*(Delivered(s, T0 + s * MIN, T0 + s * MIN) for s in range(5)))
    assert full.labels == (1, 1, 1, 1) and full.final_at_ms == T0 + 4 * MIN and full.lane == 0


@pytest.mark.parametrize(
    ("click_ms", "label", "fate"),
    [
        (HOUR_MS, 1, None),  # on the window's edge: counts
        (HOUR_MS + 1, 0, LATE),  # 1 ms after: late
        (-5 * MIN, 1, None),  # stamped up to the skew before the impression: counts
        (-5 * MIN - 1, 0, ILLEGAL_SEQUENCE),  # earlier still: illegal
    ],
)
def test_rules_window_edges_and_skew(click_ms: int, label: int, fate: str | None) -> None:
    out = _o(Delivered(0, T0, T0), Delivered(1, T0 + click_ms, T0 + HOUR_MS))
    assert out.labels == (label, 0, 0, 0) and out.fates == (None, fate)


def test_rules_events_after_a_missing_step() -> None:
    # the click is dropped: an application inside the click window is illegal, one after it late
    early = _o(Delivered(0, T0, T0), Delivered(2, T0 + 30 * MIN, T0 + 30 * MIN))
    assert early.labels == (0, 0, 0, 0) and early.fates == (None, ILLEGAL_SEQUENCE)
    later = _o(Delivered(0, T0, T0), Delivered(2, T0 + 2 * HOUR_MS, T0 + 2 * HOUR_MS))
    assert later.fates == (None, LATE)
    # no impression at all: everything is illegal_sequence
    orphan = _o(Delivered(1, T0, T0), Delivered(2, T0 + MIN, T0 + MIN))
    assert orphan.labels is None and orphan.fates == (ILLEGAL_SEQUENCE, ILLEGAL_SEQUENCE)


def test_rules_late_delivery_and_duplicates() -> None:
    imp, click = Delivered(0, T0, T0), Delivered(1, T0 + MIN, T0 + 20 * DAY_MS, after_final=True)
    out = _o(imp, click, Delivered(2, T0 + 2 * MIN, T0 + 2 * MIN))
    # the click arrived after the final (0000) went out: late; the application after it illegal
    assert out.labels == (0, 0, 0, 0) and out.fates == (None, LATE, ILLEGAL_SEQUENCE)
    dup = _o(imp, Delivered(1, T0 + MIN, T0 + MIN), Delivered(1, T0 + MIN, T0 + 5 * MIN))
    assert dup.labels == (1, 0, 0, 0) and dup.fates == (None, None, None)
    broken = _o(Delivered(0, T0, T0, parse_reason="malformed_json"), Delivered(1, T0 + MIN, T0 + MIN))
    assert broken.labels is None and broken.fates == ("malformed_json", ILLEGAL_SEQUENCE)


def test_rules_a_record_read_after_its_funnels_retention_may_meet_an_unknown_impression() -> None:
    # no click: the final (0000) is due at T0 + 1 h, and the state is kept for the retention after it
    rules = JoinRules()
    kept_until = T0 + HOUR_MS + rules.retention_ms
    imp, appl = Delivered(0, T0, T0), Delivered(2, T0 + 3 * HOUR_MS, T0 + 3 * HOUR_MS)
    # an activation 40 days on (after its window): late while the funnel is kept; read after the
    # retention it may find no funnel - an unknown impression's event, illegal_sequence
    act = Delivered(4, T0 + 40 * DAY_MS, T0 + 40 * DAY_MS + HOUR_MS)
    out = _o(imp, appl, act)
    assert out.labels == (0, 0, 0, 0) and out.fates == (None, LATE, LATE)
    assert out.purged_fates == (None, None, (ILLEGAL_SEQUENCE,))
    # read before the retention ends: the funnel is surely there, one fate only
    assert _o(imp, Delivered(4, T0 + 20 * DAY_MS, kept_until - 1)).purged_fates == (None, None)
    # a copy of the impression read after it: a duplicate while kept, late (older than the retention) if not
    copy = _o(imp, Delivered(0, T0, kept_until))
    assert copy.fates == (None, None) and copy.purged_fates == (None, (LATE,))
    # a record read a retention after its own time: late as an unknown impression's too
    old = _o(imp, Delivered(2, T0 + 3 * HOUR_MS, T0 + 3 * HOUR_MS + rules.retention_ms))
    assert old.fates == (None, LATE) and old.purged_fates == (None, (ILLEGAL_SEQUENCE, LATE))


def test_the_answer_key_takes_either_fate_of_a_record_read_after_its_funnels_retention() -> None:
    from simulators.faults import DeadLetterRow, expected_dead_letters, missing_dead_letters

    either = DeadLetterRow("i1", "activation", LATE, "rules", T0, True, (ILLEGAL_SEQUENCE,))
    plain = DeadLetterRow("i2", "click", LATE, "late", T0, True)
    optional = DeadLetterRow("i3", "click", ILLEGAL_SEQUENCE, "rules", T0, False)
    rows = [either, plain, optional]
    assert expected_dead_letters(rows) == {
        ("i1", "activation", LATE), ("i1", "activation", ILLEGAL_SEQUENCE), ("i2", "click", LATE),
        ("i3", "click", ILLEGAL_SEQUENCE),
    }
    assert missing_dead_letters(rows, set()) == [("i1", "activation", LATE), ("i2", "click", LATE)]
    seen = {("i1", "activation", ILLEGAL_SEQUENCE), ("i2", "click", ILLEGAL_SEQUENCE)}
    assert missing_dead_letters(rows, seen) == [("i2", "click", LATE)]  # i2 has one reason only


def test_cli_writes_the_answer_key(tmp_path: Path) -> None:
    from simulators.cli import main

    out = tmp_path / "sim"
    assert main(["--days", "1", "--impressions-per-day", "500", "--tail-days", "3", "--delivery", "lagging",
                 "--fault-rate", "0.02", "--out", str(out)]) == 0  # fmt: skip
    truth = [json.loads(line) for line in (out / "truth.ndjson").read_text().splitlines()]
    dead = [json.loads(line) for line in (out / "dead_letters.ndjson").read_text().splitlines()]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["delivery"] == "lagging" and len(truth) == 500 + 3 * 200
    assert all(set(t) >= {"final_labels", "final_at_ms", "final_lane", "final_required"} for t in truth)
    assert dead and {d["step"] for d in dead} <= set(STEPS)
    assert sum(meta["expected_dead_letters"].values()) == len(dead)


def test_a_stalled_partition_delivers_nothing_during_its_stall_whatever_the_faults(sim: FunnelSimulator) -> None:
    """The lagging profile's stall holds every record of the stalled impressions partition until
    the stall ends - a duplicate or a held-up (out-of-order) impression too: a stalled partition
    delivers nothing. (An out-of-order impression used to be delivered right after its click,
    in the middle of the stall: two of them moved the partition's impressions lane hours ahead of
    the backlog, and the clicks held for the backlog's impressions gave up - 105 labels the answer
    key did not expect, seed 11, 20,000 impressions a day.)"""
    from simulators.faults import kafka_partition

    stream = SimulatedStream(sim, 2, FaultConfig.uniform(0.05), tail_days=1, delivery="lagging")
    recs = list(stream)
    faulted = {(f.impression_id, f.kind) for f in stream.faults}
    in_window = Counter()
    for r in recs:
        if r.step != "impression":
            continue
        true = r.timestamp_ms
        day = true // DAY_MS
        begin, end = day * DAY_MS + 10 * HOUR_MS, day * DAY_MS + 13 * HOUR_MS
        if kafka_partition(r.key, 4) == day % 4:
            assert not begin <= r.deliver_ms < end, (r.key, (true - begin) / HOUR_MS, (r.deliver_ms - begin) / HOUR_MS)
            if begin <= true < end:
                kinds = {k for iid, k in faulted if iid == r.key.decode()}
                in_window.update(kinds or {"none"})
    assert in_window["out_of_order"] and in_window["duplicate"]  # the faults the stall must hold too


@pytest.mark.parametrize("delivery", PROFILES)
def test_an_out_of_order_record_arrives_within_its_topics_allowed_lateness(sim: FunnelSimulator, delivery: str) -> None:
    """The ``out_of_order`` fault holds a predecessor up until just after its successor arrives:
    out of order, not late - the answer key counts it, so it must reach the joiner within its
    topic's allowed lateness. After a lagging topic's event (applications 3 h behind) a click
    held up that long was late, and the key still counted it (seed 13, 20,000 a day: one label)."""
    stream = SimulatedStream(sim, 2, FaultConfig.uniform(0.05), tail_days=1, delivery=delivery)
    recs = {(r.key.decode(), r.step): r for r in stream}
    lateness, prof = JoinRules().lateness_ms, profile(delivery)
    held = 0
    for f in stream.faults:
        if f.kind == "out_of_order":
            k = STEPS.index(f.step) - 1
            r = recs[f.impression_id, STEPS[k]]
            # within the allowed lateness - or within what the profile itself does to that topic
            # (a stalled impressions partition's backlog, judged by the partition's own lane)
            most = max(lateness[k], prof.max_delay_ms(k))
            assert r.deliver_ms - r.timestamp_ms <= most, (f, (r.deliver_ms - r.timestamp_ms) / HOUR_MS)
            held += 1
    assert held > 5
