"""The join driver (``stream.join.driver.FunnelJoin``) on an in-memory store and a fake clock: what it
writes, sends, dead-letters and counts per record; sweeps and both commit protocols (the tests'
the one commit protocol: ``take_sweep``, then ``persist_swept``). Fast: no Kafka, no RocksDB.
Expected values come from the documented rules (module docs of ``stream.join.driver``,
``stream.join.funnel``, ``stream.join.watermark``), written out by hand."""

from __future__ import annotations

import json
import struct

import pytest
from prometheus_client import CollectorRegistry

from stream.contract.events import Event, encode_event
from stream.join.driver import SWEPT_KEY, FunnelJoin, JoinTopics, Output, pack_swept, unpack_swept
from stream.join.funnel import NO_SWEPT, FunnelConfig, decode_state, reached
from stream.join.store import InMemoryStore
from stream.ops.clock import FakeClock
from stream.ops.metrics import JoinerMetrics

TOPICS = JoinTopics(("imp", "clk", "app", "apr", "act"), "samples", "dead")
T0 = 1_767_225_600_000
MIN = 60_000
HOUR = 60 * MIN
CFG = FunnelConfig()  # click window 1 h, first sample 30 min after the impression
NO_LATENESS = (0, 0, 0, 0, 0)


def rec(step: int, iid: str, t: int, bank: str = "bank_1") -> bytes:
    feats = {"f": "v"} if step == 0 else None
    return encode_event(Event(step, f"{iid}/{step}", iid, t, bank, feats))


class Rig:
    def __init__(self, start_ms: int = T0, **kw: object) -> None:
        self.stores: dict[int, InMemoryStore] = {}
        self.clock = FakeClock(start_ms)
        self.registry = CollectorRegistry()
        self.metrics = JoinerMetrics(self.registry)
        kw.setdefault("lateness_ms", NO_LATENESS)
        kw.setdefault("max_future_ms", 0)  # simulated time, unless a test checks the clock
        self.kw = kw
        self.join = self.new_join()

    def store(self, p: int) -> InMemoryStore:
        return self.stores.setdefault(p, InMemoryStore())

    def new_join(self) -> FunnelJoin:
        return FunnelJoin(CFG, TOPICS, self.store, self.clock, self.metrics, **self.kw)  # type: ignore[arg-type]

    def feed(self, step: int, iid: str, t: int, partition: int = 0, behind: bool = False) -> list[Output]:
        out: list[Output] = []
        self.join.on_record(TOPICS.events[step], partition, iid.encode(), rec(step, iid, t), behind, out, offset=7)
        return out

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


def samples(out: list[Output]) -> list[dict]:
    return [json.loads(o.value) for o in out if o.topic == "samples"]


def dead(out: list[Output]) -> list[dict]:
    return [json.loads(o.value) for o in out if o.topic == "dead"]


def test_swept_watermarks_pack_as_five_big_endian_longs_and_read_the_old_single_value() -> None:
    sw = (1, -2, 3, 2**40, -(2**62))
    assert pack_swept(sw) == struct.pack(">5q", *sw)
    assert unpack_swept(pack_swept(sw)) == sw
    assert unpack_swept(struct.pack(">q", 42)) == (42, 42, 42, 42, 42)  # a store from before the lanes
    assert unpack_swept(None) == NO_SWEPT and unpack_swept(b"") == NO_SWEPT


def test_lateness_needs_one_value_per_topic() -> None:
    with pytest.raises(ValueError, match="one allowed lateness per event topic"):
        Rig(lateness_ms=(0, 0, 0, 0))


def test_a_malformed_record_is_dead_lettered_with_where_it_came_from() -> None:
    r = Rig()
    out: list[Output] = []
    r.join.on_record("clk", 3, b"k1", b"{broken", False, out, offset=41)
    assert [(o.topic, o.key) for o in out] == [("dead", b"k1")]
    d = json.loads(out[0].value)
    assert (d["reason"], d["source_topic"], d["partition"], d["offset"], d["key"]) == (
        "malformed_json", "clk", 3, 41, "k1")
    assert d["raw"] == "{broken" and d["time_ms"] == T0
    assert r.value("aitm_joiner_dead_letters_total", reason="malformed_json") == 1
    assert r.value("aitm_joiner_events_total", type="click") == 1
    assert len(r.store(3)) == 0
    out = []
    r.join.on_record("imp", 0, None, None, False, out)  # a tombstone: no value, no key
    assert out[0].key == b"" and json.loads(out[0].value)["raw"] is None


def test_an_event_stamped_far_in_the_future_is_dead_lettered_not_joined() -> None:
    r = Rig(max_future_ms=HOUR)
    assert r.feed(0, "i1", T0 + HOUR) == []  # exactly the allowed hour ahead: accepted
    out = r.feed(0, "i2", T0 + HOUR + 1)
    d = dead(out)
    assert [x["reason"] for x in d] == ["future"] and "3600 s ahead" in d[0]["detail"]
    assert d[0]["offset"] == 7 and d[0]["partition"] == 0
    assert r.store(0).get(b"i2") is None and r.store(0).get(b"i1") is not None
    assert r.value("aitm_joiner_dead_letters_total", reason="future") == 1
    r0 = Rig(max_future_ms=0)  # 0: simulated time, no check
    assert r0.feed(0, "i3", T0 + 100 * HOUR) == [] and r0.store(0).get(b"i3") is not None


def test_records_are_joined_in_the_store_of_their_partition_and_duplicates_counted() -> None:
    r = Rig()
    r.feed(0, "i1", T0, partition=2)
    r.feed(1, "i1", T0 + MIN, partition=2)
    state = decode_state(r.store(2).get(b"i1") or b"")
    assert (state.imp_ms, state.times[0], state.bank_id) == (T0, T0 + MIN, "bank_1")
    assert state.features_json == b'{"f":"v"}'
    assert r.feed(1, "i1", T0 + 2 * MIN, partition=2) == []  # the click again
    assert r.value("aitm_joiner_duplicate_events_total", type="click") == 1
    assert r.value("aitm_joiner_duplicate_events_total", type="impression") in (None, 0)
    assert decode_state(r.store(2).get(b"i1") or b"").times[0] == T0 + MIN  # unchanged
    assert r.join.open_funnels() == 1 and len(r.store(0)) == 0
    assert r.value("aitm_joiner_events_total", type="impression") == 1
    assert r.value("aitm_joiner_events_total", type="click") == 2


def test_an_activated_funnel_sends_its_final_at_once_with_the_impression_features() -> None:
    r = Rig()
    for step, t in enumerate((T0, T0 + MIN, T0 + 2 * MIN, T0 + 3 * MIN, T0 + 4 * MIN)):
        out = r.feed(step, "i1", t)
    (s,) = samples(out)
    assert (s["kind"], s["seq"], s["labels"], s["mature"]) == ("final", 5, [1, 1, 1, 1], [True] * 4)
    assert (s["impression_id"], s["bank_id"], s["event_time_ms"], s["features"]) == ("i1", "bank_1", T0, {"f": "v"})
    assert s["elapsed_ms"] == 4 * MIN
    assert out[0].key == b"i1"
    assert r.value("aitm_joiner_samples_total", kind="final") == 1
    assert r.value("aitm_joiner_label_delay_seconds_count") == 1
    assert r.value("aitm_joiner_label_delay_seconds_sum") == pytest.approx(240.0)


def commit(r: Rig, p: int = 0) -> None:
    """The commit protocol the joiner runs: take the sweep, then persist it once its outputs are out."""
    wm = r.join.take_sweep(p)
    if wm is not None:
        r.join.persist_swept(p, wm)


def impressions(r: Rig, times: list[int], partition: int = 0) -> None:
    for n, t in enumerate(times):
        r.feed(0, f"x{n}-{t}", t, partition)


def test_a_sweep_sends_what_is_due_and_the_commit_stores_the_lanes_after() -> None:
    r = Rig()
    r.feed(0, "i1", T0)
    impressions(r, [T0 + 31 * MIN, T0 + 32 * MIN])  # impressions' frontier: the second newest
    assert r.join.sweep_due(0)
    out: list[Output] = []
    assert r.join.sweep(0, out) == 1  # one state due: i1's first sample (30 min after it)
    (s,) = samples(out)
    assert (s["impression_id"], s["kind"], s["seq"], s["labels"]) == ("i1", "first", 0, [0, 0, 0, 0])
    assert s["watermark_ms"] == T0 + 31 * MIN
    assert r.store(0).get_meta(SWEPT_KEY) is None  # nothing stored before the samples are out
    commit(r)
    assert unpack_swept(r.store(0).get_meta(SWEPT_KEY))[0] == T0 + 31 * MIN
    out = []
    assert r.join.sweep(0, out) == 0 and out == []  # nothing due twice
    # a new driver over the same store resumes from the stored lanes: no first sample again
    r.join = r.new_join()
    assert r.join.parts == {}
    assert r.join.part(0).swept[0] == T0 + 31 * MIN
    r.clock.advance(1000)
    assert not r.join.sweep_due(0)  # no lane moved since


def test_take_sweep_then_persist_swept() -> None:
    r = Rig()
    r.feed(0, "i1", T0)
    impressions(r, [T0 + 31 * MIN, T0 + 32 * MIN])
    r.join.sweep_due(0)
    out: list[Output] = []
    r.join.sweep(0, out)
    taken = r.join.take_sweep(0)
    assert taken is not None and taken[0] == T0 + 31 * MIN
    assert r.join.part(0).swept == taken  # the records that follow are judged against it at once
    assert r.store(0).get_meta(SWEPT_KEY) is None  # ... but it is stored only once persisted
    assert r.join.take_sweep(0) is None  # taken once
    r.join.persist_swept(0, taken)
    assert unpack_swept(r.store(0).get_meta(SWEPT_KEY)) == taken
    # a sweep that moved nothing has nothing to take
    r.join.sweep(0, out)
    assert r.join.take_sweep(0) is None
    # a partition revoked before its outputs were acknowledged: nothing is written
    r.join.forget(0)
    r.join.persist_swept(0, (T0 + 99 * HOUR,) * 5)  # type: ignore[arg-type]
    assert unpack_swept(r.store(0).get_meta(SWEPT_KEY)) == taken


def test_an_event_of_a_lane_already_swept_past_its_final_is_late_and_the_funnel_purged_later() -> None:
    r = Rig()
    r.feed(0, "i1", T0)
    # clicks topic far past i1's click window (1 h): its final (no click) is due on lane 1
    impressions(r, [T0 + 2 * HOUR, T0 + 2 * HOUR + 1])
    for t in (T0 + 90 * MIN, T0 + 91 * MIN):
        r.feed(1, f"c{t}", t)  # clicks of other impressions (held: no impression) move lane 1
    r.join.sweep_due(0, force=True)
    out: list[Output] = []
    r.join.sweep(0, out)
    commit(r)
    finals = [s for s in samples(out) if s["impression_id"] == "i1" and s["kind"] == "final"]
    assert [s["labels"] for s in finals] == [[0, 0, 0, 0]]
    assert finals[0]["watermark_ms"] == T0 + 91 * MIN  # the clicks lane (its newest record) made it final
    out = r.feed(1, "i1", T0 + 50 * MIN)  # in its window, but its final went out: late
    assert [d["reason"] for d in dead(out)] == ["late"] and dead(out)[0]["partition"] == 0
    assert out[0].key == b"i1"
    assert r.store(0).get(b"i1") is not None  # kept for the retention period
    # 27 days later on the clicks lane (and the impressions lane): purged
    later = T0 + CFG.retention_ms + 2 * HOUR
    impressions(r, [later, later + 1])
    for t in (later, later + 1):
        r.feed(1, f"c{t}", t)
    r.join.sweep_due(0, force=True)
    r.join.sweep(0, [])
    assert r.store(0).get(b"i1") is None
    # an after-window activation read now finds no funnel: an unknown impression's event, held for
    # its impression and dead-lettered once the impressions' topic is past its grace - not lost
    act = later + 3 * HOUR
    assert not dead(r.feed(4, "i1", act))
    commit(r)
    passed = act + CFG.grace_ms + 4 * CFG.skew_ms + 30 * MIN + 1  # plus the impressions' lateness
    impressions(r, [passed, passed + 1])
    r.join.sweep_due(0, force=True)
    out = []
    r.join.sweep(0, out)
    assert [(d["reason"], d["source_topic"]) for d in dead(out) if d["key"] == "i1"] == [("illegal_sequence", "act")]
    assert r.store(0).get(b"i1") is None


def test_sweep_due_waits_for_the_interval_unless_forced() -> None:
    r = Rig(sweep_interval_s=10.0)
    impressions(r, [T0, T0 + 1])
    assert r.join.sweep_due(0)  # the impressions lane moved
    impressions(r, [T0 + 2, T0 + 3])
    r.clock.advance(9_999)
    assert not r.join.sweep_due(0)  # 9.999 s after the last one
    r.clock.advance(1)
    assert r.join.sweep_due(0)
    impressions(r, [T0 + 4, T0 + 5])
    assert r.join.sweep_due(0, force=True)


def test_watermark_lag_is_the_slowest_partition_beyond_its_allowed_lateness() -> None:
    r = Rig()
    assert r.join.watermark_lag_ms() == 0  # no partition yet
    impressions(r, [T0, T0 + 10 * MIN, T0 + 20 * MIN], partition=0)
    impressions(r, [T0, T0 + MIN, T0 + 2 * MIN], partition=1)
    r.join.sweep_due(0, force=True)
    r.join.sweep_due(1, force=True)
    # partition 0: impressions lane at its frontier (T0 + 10 min); the other lanes never moved
    # (NO_WATERMARK: left out), so the lag is 0 there; partition 1 likewise
    assert r.join.watermark_lag_ms() == 0
    for t in (T0, T0 + MIN):
        r.feed(1, f"c{t}", t, partition=0)
    r.join.sweep_due(0, force=True)
    # clicks lane of partition 0: its newest record (T0 + 1 min, below the impressions' T0 + 10 min)
    assert r.join.watermark_lag_ms() == 9 * MIN


def test_the_defaults_sweep_every_quarter_second_idle_after_30_s_and_refuse_an_hour_ahead() -> None:
    clock = FakeClock(T0)
    store = InMemoryStore()
    j = FunnelJoin(CFG, TOPICS, lambda p: store, clock)
    out: list[Output] = []
    j.on_record("imp", 0, b"a", rec(0, "a", T0 + HOUR), False, out)
    assert out == [] and store.get(b"a") is not None  # exactly an hour ahead: accepted
    j.on_record("imp", 0, b"b", rec(0, "b", T0 + HOUR + 1), False, out)
    assert [json.loads(o.value)["reason"] for o in out] == ["future"]
    j.on_record("imp", 0, b"c", rec(0, "c", T0 + HOUR), False, [])
    assert j.sweep_due(0)  # two impressions: the lane moved
    for iid in ("d", "e"):
        j.on_record("imp", 0, iid.encode(), rec(0, iid, T0 + HOUR + 1), False, [])
    clock.advance(249)
    assert not j.sweep_due(0)
    clock.advance(1)
    assert j.sweep_due(0)
    j.caught_up(0, 1)  # clicks read to their end (the default), never a record
    j.sweep_due(0, force=True)
    assert j.part(0).wm.value[1] == NO_SWEPT[1]
    clock.advance(30_000 - 250)  # 30 s after the partition was opened
    j.sweep_due(0, force=True)
    assert j.part(0).wm.value[1] == T0 + HOUR - 30 * MIN  # idle: the impressions' frontier - lateness


def test_lateness_error_message() -> None:
    with pytest.raises(ValueError, match=r"^lateness_ms: one allowed lateness per event topic \(impressions \.\. activations\)$"):
        Rig(lateness_ms=(0, 0, 0, 0))


def test_caught_up_says_whether_a_topic_is_read_to_its_end() -> None:
    r = Rig(idle_timeout_s=10.0)
    impressions(r, [T0, T0 + HOUR, T0 + 2 * HOUR], partition=1)
    r.join.caught_up(1, 2, caught_up=False)  # applications: a backlog
    r.join.caught_up(1, 3, caught_up=True)  # approvals: read to their end
    r.join.caught_up(1, 4)  # activations: read to their end (the default)
    r.clock.advance(10_000)
    r.join.sweep_due(1, force=True)
    lanes = r.join.part(1).wm.value
    assert lanes[2] == NO_SWEPT[2]  # a backlog holds its lane
    assert lanes[3] == lanes[4] == T0 + HOUR  # idle: follow the impressions' frontier (no lateness here)
    assert lanes[1] == NO_SWEPT[1]  # clicks: position never reported, not idle
    assert r.join.part(0).wm.value == NO_SWEPT  # another partition: untouched


def test_a_record_read_at_its_topics_end_starts_that_topics_idle_timer() -> None:
    r = Rig(idle_timeout_s=30.0)
    impressions(r, [T0, T0 + HOUR, T0 + 2 * HOUR])
    r.clock.advance(20_000)
    r.feed(1, "c1", T0, behind=False)  # the last click on the partition, at 20 s
    r.clock.advance(11_000)  # 31 s after the partition opened, 11 s after the click: not idle
    r.join.sweep_due(0, force=True)
    assert r.join.part(0).wm.value[1] == T0  # its own newest record
    r.clock.advance(19_000)  # 30 s after the click: idle without any caught_up() call
    r.join.sweep_due(0, force=True)
    assert r.join.part(0).wm.value[1] == T0 + HOUR


def test_a_record_of_another_step_than_its_topic_is_dead_lettered() -> None:
    r = Rig()
    out: list[Output] = []
    r.join.on_record("clk", 0, b"i1", rec(0, "i1", T0), False, out, offset=3)
    (d,) = dead(out)
    assert (d["reason"], d["source_topic"]) == ("wrong_topic", "clk")
    assert d["detail"] == "a impression event on the click topic"
    assert len(r.store(0)) == 0


def test_dead_letters_carry_the_raw_record_its_topic_key_and_why() -> None:
    r = Rig(max_future_ms=HOUR)
    out: list[Output] = []
    r.join.on_record("imp", 0, b"k", b"[1]", False, out, offset=1)
    (d,) = dead(out)
    assert (d["raw"], d["source_topic"], d["key"]) == ("[1]", "imp", "k")
    assert d["detail"] == "event must be a JSON object, got list"
    out = r.feed(1, "i9", T0 + 2 * HOUR)
    (d,) = dead(out)
    assert d["reason"] == "future" and d["raw"] == rec(1, "i9", T0 + 2 * HOUR).decode()
    assert (d["source_topic"], d["key"]) == ("clk", "i9")


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_an_event_whose_own_topic_is_past_its_final_is_late_before_any_sweep(step: int) -> None:
    r = Rig()
    for k in range(step):  # the funnel reached step - 1, one minute apart
        r.feed(k, "i1", T0 + k * MIN)
    pred = T0 + (step - 1) * MIN
    final_at = pred + CFG.windows_ms[step - 1]
    impressions(r, [final_at + HOUR, final_at + HOUR + 1])
    for n, t in enumerate((final_at + MIN, final_at + MIN + 1)):
        r.feed(step, f"other{n}", t)  # two records of the step's topic past i1's final time
    out = r.feed(step, "i1", pred + MIN)  # inside its window, but its topic already passed the final
    (d,) = dead(out)
    assert (d["reason"], d["source_topic"], d["key"]) == ("late", TOPICS.events[step], "i1")
    assert d["raw"] == rec(step, "i1", pred + MIN).decode()
    assert "arrived after its funnel's final" in d["detail"]
    assert samples(out) == []


def test_a_step_before_the_first_sample_went_out_is_no_correction() -> None:
    r = Rig()
    r.feed(0, "i1", T0)
    for n, t in enumerate((T0 + 40 * MIN, T0 + 41 * MIN)):
        r.feed(1, f"other{n}", t)  # the clicks topic is at 40 min: past i1's first-sample time
    out = r.feed(1, "i1", T0 + 35 * MIN)  # no sweep ran: the first sample is not out
    assert out == []
    assert decode_state(r.store(0).get(b"i1") or b"").times[0] == T0 + 35 * MIN


def test_a_later_sweep_sends_the_final_after_the_first() -> None:
    r = Rig()
    r.feed(0, "i1", T0)
    impressions(r, [T0 + 31 * MIN, T0 + 32 * MIN])
    r.join.sweep_due(0, force=True)
    out: list[Output] = []
    r.join.sweep(0, out)
    commit(r)
    assert [(s["impression_id"], s["kind"]) for s in samples(out)] == [("i1", "first")]
    impressions(r, [T0 + 3 * HOUR, T0 + 3 * HOUR + 1])
    for t in (T0 + 2 * HOUR, T0 + 2 * HOUR + 1):
        r.feed(1, f"c{t}", t)
    r.join.sweep_due(0, force=True)
    out = []
    r.join.sweep(0, out)
    finals = [s for s in samples(out) if s["impression_id"] == "i1"]
    assert [(s["kind"], s["labels"]) for s in finals] == [("final", [0, 0, 0, 0])]


def test_a_commit_without_a_new_sweep_changes_nothing() -> None:
    r = Rig()
    commit(r)  # nothing swept yet
    assert r.join.part(0).swept == NO_SWEPT and r.store(0).get_meta(SWEPT_KEY) is None
    impressions(r, [T0, T0 + 1])
    r.join.sweep_due(0, force=True)
    r.join.sweep(0, [])
    commit(r)
    swept = r.join.part(0).swept
    commit(r)  # again, with no sweep in between
    assert r.join.part(0).swept == swept and unpack_swept(r.store(0).get_meta(SWEPT_KEY)) == swept
    r.join.forget(5)  # a partition never seen: nothing to forget, no error


def test_a_sweep_counts_the_states_it_visits_and_skips_a_due_key_whose_state_is_gone() -> None:
    class GhostStore(InMemoryStore):
        """A store whose index still names a key it no longer holds (a stale index)."""

        def pop_due(self, lane: int, until_ms: int) -> list[bytes]:
            keys = super().pop_due(lane, until_ms)
            return [b"ghost", *keys] if keys else keys

    r = Rig()
    r.stores[0] = GhostStore()
    r.feed(0, "i1", T0)
    r.feed(0, "i2", T0 + MIN)
    impressions(r, [T0 + 40 * MIN, T0 + 41 * MIN])
    r.join.sweep_due(0, force=True)
    out: list[Output] = []
    assert r.join.sweep(0, out) == 2  # i1 and i2 (the ghost is skipped, the rest still swept)
    assert sorted(s["impression_id"] for s in samples(out)) == ["i1", "i2"]


def test_a_funnel_final_and_purged_in_one_sweep_still_sends_its_final() -> None:
    r = Rig()
    r.feed(0, "i1", T0)
    later = T0 + CFG.retention_ms + 2 * HOUR  # every lane jumps past the final and the retention
    impressions(r, [later, later + 1])
    for t in (later, later + 1):
        r.feed(1, f"c{t}", t)
    r.join.sweep_due(0, force=True)
    out: list[Output] = []
    r.join.sweep(0, out)
    finals = [s for s in samples(out) if s["impression_id"] == "i1"]
    assert [(s["kind"], s["labels"], s["features"]) for s in finals] == [("final", [0, 0, 0, 0], {"f": "v"})]
    assert r.store(0).get(b"i1") is None


def test_a_held_event_that_gives_up_in_a_sweep_is_dead_lettered_with_its_partition() -> None:
    r = Rig()
    r.feed(2, "i1", T0, partition=3)  # an application, no impression: held
    impressions(r, [T0 + HOUR, T0 + HOUR + 1], partition=3)  # impressions past its grace period
    r.join.sweep_due(3, force=True)
    out: list[Output] = []
    r.join.sweep(3, out)
    (d,) = dead(out)
    assert (d["reason"], d["partition"], d["source_topic"], d["key"]) == ("illegal_sequence", 3, "app", "i1")
    assert d["raw"] == rec(2, "i1", T0).decode()


def test_a_funnel_whose_final_went_out_in_a_sweep_is_purged_after_the_retention() -> None:
    r = Rig()
    r.feed(0, "i1", T0)

    def lanes_at(t: int) -> None:
        impressions(r, [t, t + 1])
        for x in (t, t + 1):
            r.feed(1, f"c{x}", x)
        r.join.sweep_due(0, force=True)
        out: list[Output] = []
        r.join.sweep(0, out)
        commit(r)
        r.sent = samples(out)  # type: ignore[attr-defined]

    lanes_at(T0 + 2 * HOUR)  # the final goes out (final already: no first); nothing else happens to i1
    assert [s["kind"] for s in r.sent if s["impression_id"] == "i1"] == ["final"]  # type: ignore[attr-defined]
    assert r.store(0).get(b"i1") is not None  # kept for the retention period
    lanes_at(T0 + HOUR + CFG.retention_ms + MIN)  # the clicks lane 27 days past the final time
    assert r.store(0).get(b"i1") is None


DAY = 24 * HOUR


def _clicked_funnel_then_quiet(r: Rig) -> None:
    """i1 clicked at T0 + 1 min; impressions then run four days on, and the partition goes quiet
    (every step topic read to its end). i1's final waits on the applications lane, which follows
    the impressions' clock once that topic is idle."""
    r.feed(0, "i1", T0)
    r.feed(1, "i1", T0 + MIN)
    impressions(r, [T0 + 4 * DAY, T0 + 4 * DAY + MIN])
    for step in (1, 2, 3, 4):
        r.join.caught_up(0, step)


def _sweep(r: Rig) -> list[dict]:
    out: list[Output] = []
    r.join.sweep_due(0, force=True)
    r.join.sweep(0, out)
    commit(r)
    return samples(out)


def test_a_partition_taken_over_finishes_its_due_funnels_without_new_records() -> None:
    """The rule (stream/join/watermark.py): lanes start where the partition's last sweep left
    them, so a new owner - a rebalance, a restart - goes on where the last one stopped. A
    partition that gets no more records after the takeover (the tail of a stream, a quiet
    partner) must still see its silent topics go idle and its due finals out, exactly as its
    first owner would have: a rebalance changes nothing a user receives."""
    alone = Rig(idle_timeout_s=30.0)
    _clicked_funnel_then_quiet(alone)
    _sweep(alone)
    alone.clock.advance(31_000)
    finals = [s for s in _sweep(alone) if s["kind"] == "final" and s["impression_id"] == "i1"]
    assert [s["labels"] for s in finals] == [[1, 0, 0, 0]]

    moved = Rig(idle_timeout_s=30.0)
    _clicked_funnel_then_quiet(moved)
    assert not [s for s in _sweep(moved) if s["kind"] == "final" and s["impression_id"] == "i1"]
    moved.join.forget(0)  # revoked; the next owner recovers the same store and gets no record
    moved.join = moved.new_join()
    for step in (1, 2, 3, 4):
        moved.join.caught_up(0, step)  # what its consumer reports: read to their ends
    moved.clock.advance(31_000)
    finals = [s for s in _sweep(moved) if s["kind"] == "final" and s["impression_id"] == "i1"]
    assert [s["labels"] for s in finals] == [[1, 0, 0, 0]]


def test_the_lanes_recent_event_times_are_stored_with_the_swept_lanes_only() -> None:
    """They are written with the swept watermarks (once the sweep's outputs are out), as they were
    when the sweep was taken: records joined after it, whose states may not be stored yet, do not
    move a new owner's lanes."""
    r = Rig()
    impressions(r, [T0, T0 + HOUR])
    r.join.sweep_due(0, force=True)
    r.join.sweep(0, [])
    taken = r.join.take_sweep(0)
    assert taken is not None
    impressions(r, [T0 + 5 * HOUR, T0 + 6 * HOUR])  # after the flush's snapshot
    r.join.persist_swept(0, taken)
    r.join = r.new_join()
    assert r.join.part(0).wm.frontier(0) == T0  # the second newest of T0, T0 + 1 h
    assert r.join.part(0).swept == taken


def test_clicks_landing_just_after_a_burst_of_impressions_count() -> None:
    """``bench chaos --seed 41 --delivery batch-feeds --cpu-hog`` (round 16): every topic silent for
    longer than the idle timeout (the source stalled, or the joiner did), so every topic is idle;
    then the source catches up and a batch of three hours of impressions lands 10 ms before the
    batch of those hours' clicks. An idle topic follows the impressions as they were one idle
    timeout ago, so those clicks count: no final without them, no dead letter."""
    r = Rig(idle_timeout_s=2.0, lateness_ms=(30 * MIN, 30 * MIN, 6 * HOUR, 6 * HOUR, 48 * HOUR))
    impressions(r, [T0, T0 + MIN, T0 + 2 * MIN])
    r.feed(1, f"x1-{T0 + MIN}", T0 + 2 * MIN)  # the clicks, read to their end
    for step in (2, 3, 4):
        r.join.caught_up(0, step)
    r.clock.advance(4_500)  # the outage: nothing delivered, sweeps go on
    assert _sweep(r) == []
    burst = [("imp", 0, f"b{k}".encode(), rec(0, f"b{k}", T0 + 3 * MIN + k * 10 * MIN), 100 + k, k < 18)
             for k in range(19)]  # fmt: skip
    out: list[Output] = []
    r.join.on_batch(burst, out)
    r.clock.advance(10)
    r.join.on_batch([("clk", 0, b"b0", rec(1, "b0", T0 + 8 * MIN), 50, False)], out)
    assert dead(out) == []  # in time: delivered 10 ms after the impressions that moved the frontier
    r.clock.advance(3_000)  # the clicks silent again, for longer than the idle timeout
    finals = {s["impression_id"]: s["labels"] for s in _sweep(r) if s["kind"] == "final"}
    assert "b0" not in finals  # clicked: its final waits for the applications
    state = r.store(0).get(b"b0")
    assert state is not None and reached(decode_state(state)) == 1
    assert finals["b1"] == [0, 0, 0, 0]  # the clicks lane has passed b1's click window since: its final, no click
