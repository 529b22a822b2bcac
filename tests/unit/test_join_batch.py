"""The batch path (``FunnelJoin.on_batch``, ``parse_events``) makes the same decisions as the
per-record path (``on_record``, ``parse_event``): the same samples and dead letters per impression,
in the same order, the same states, due times and counters, whatever the batches."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from stream.contract.events import InvalidEvent, parse_event, parse_events
from stream.join.driver import BatchRecord, FunnelJoin, JoinTopics, Output
from stream.join.funnel import FunnelConfig, features_json
from stream.join.store import InMemoryStore
from stream.ops.clock import FakeClock
from stream.ops.metrics import JoinerMetrics
from tests.joinhelpers import TOPICS_5, event_bytes, small_stream

STEP_NAMES = ("impression", "click", "application", "approval", "activation")
T0 = 1_767_225_600_000


# --- parse_events == parse_event, record by record ------------------------------------------------


def _same(raws: list[bytes | None], types: list[str | None]) -> None:
    got = parse_events(raws, types)
    assert len(got) == len(raws)
    for raw, etype, g in zip(raws, types, got, strict=True):
        try:
            want: object = parse_event(raw if raw is not None else b"", etype)
        except InvalidEvent as exc:
            want = exc
        if isinstance(want, InvalidEvent):
            assert isinstance(g, InvalidEvent), (raw, g)
            assert (g.reason, g.message) == (want.reason, want.message), raw
        else:
            assert g == want, raw


GOOD = event_bytes(1, "i1", T0)
IMP = event_bytes(0, "i2", T0)
TRICKY: list[bytes | None] = [
    GOOD, IMP, b'{"a":1,"a":2}', b'{"x":NaN}', b" " + GOOD, GOOD + b"\n", b"1", b"2", b"12", b"",
    None, b'{"schema_version":1', b',"event_type":"click"}', b"[1,2]", b"\xff\xfe", "é".encode() + GOOD,
    GOOD.replace(b'"i1"', '"ï1"'.encode()), b'"str"', b"null", b"{}" * 2, b"x" * 70_000, GOOD[:-1], b"}" + GOOD,
    GOOD.replace(b'"click"', b'"approval"'), IMP.replace(b'"features":{', b'"features":{"f":1,'),
]  # fmt: skip


def test_parse_events_reads_each_record_as_parse_event_does() -> None:
    _same(TRICKY, ["click", "impression"] + ["click"] * (len(TRICKY) - 2))
    for i in range(len(TRICKY)):  # every record beside every other, both orders
        for j in range(len(TRICKY)):
            _same([TRICKY[i], TRICKY[j], GOOD], ["click", "click", "click"])


fragment = st.one_of(
    st.sampled_from([b"{", b"}", b"[", b"]", b",", b":", b'"a"', b"1", b" ", b"NaN", b'"\\u00e9"', b"null"]),
    st.sampled_from([x for x in TRICKY if x is not None and len(x) < 1000]),
    st.binary(max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.lists(fragment, max_size=6).map(b"".join)), max_size=12))
def test_parse_events_equals_parse_event_on_any_bytes(raws: list[bytes | None]) -> None:
    _same(raws, ["click"] * len(raws))


# --- on_batch == on_record over a simulated stream -------------------------------------------------


class Run:
    """One FunnelJoin on in-memory stores, fed fetch by fetch on a fake clock that follows the
    delivery time; after each fetch, a sweep of every partition and its commit (as a flush)."""

    def __init__(self, fast_core: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.stores: dict[int, InMemoryStore] = {}
        self.clock = FakeClock(T0)
        self.join = FunnelJoin(FunnelConfig(), JoinTopics(TOPICS_5, "samples", "dead-letters"),
                               lambda p: self.stores.setdefault(p, InMemoryStore()), self.clock,
                               JoinerMetrics(self.registry), max_future_ms=3_600_000, fast_core=fast_core)  # fmt: skip
        self.by_key: dict[bytes, list[tuple[str, bytes]]] = defaultdict(list)

    def collect(self, out: list[Output]) -> None:
        for o in out:
            self.by_key[o.key].append((o.topic, o.value))

    def flush(self) -> None:
        for p in sorted(self.join.parts):
            if self.join.sweep_due(p, force=True):
                out: list[Output] = []
                self.join.sweep(p, out)
                self.collect(out)
                wm = self.join.take_sweep(p)
                if wm is not None:
                    self.join.persist_swept(p, wm)

    def metric(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(s.labels.items())): s.value for m in self.registry.collect() for s in m.samples
                if s.name == name}  # fmt: skip


def feed(run: Run, batch: list[BatchRecord], batched: bool) -> list[Output]:
    """``batch`` through ``on_batch`` at once, or a record at a time through ``on_record``."""
    out: list[Output] = []
    if batched:
        run.join.on_batch(batch, out)
    else:
        for topic, p, key, value, offset, behind in batch:
            run.join.on_record(topic, p, key, value, behind, out, offset)
    return out


def _fetches(seed: int, chunk: int, delivery: str) -> list[tuple[int, list[BatchRecord]]]:
    """(deliver_ms, records) per fetch: consecutive records of one partition, up to ``chunk``."""
    from simulators.faults import kafka_partition

    stream = small_stream(seed=seed, per_day=600, days=2, tail_days=18, delivery=delivery)
    recs = list(stream)
    fetches: list[tuple[int, list[BatchRecord]]] = []
    open_: dict[int, list[BatchRecord]] = {}
    offsets: dict[tuple[str, int], int] = defaultdict(int)
    for i, r in enumerate(recs):
        topic = TOPICS_5[STEP_NAMES.index(r.step)]
        p = kafka_partition(r.key, 2)
        off = offsets[(topic, p)]
        offsets[(topic, p)] += 1
        batch = open_.setdefault(p, [])
        behind = i + 1 < len(recs) and i % 7 != 0  # a record now and then read at its topic's end
        batch.append((topic, p, r.key, r.value if i % 211 else None, off, behind))  # some tombstones too
        if len(batch) >= chunk or i % (chunk * 3 + 1) == 0:
            fetches.append((r.deliver_ms, batch))
            open_[p] = []
    fetches.extend((recs[-1].deliver_ms, b) for b in open_.values() if b)
    return fetches


def outputs(run: Run) -> dict[tuple[str, bytes], list[bytes]]:
    """Per topic and key, what went out: a key's samples in their order (they share a partition of
    ``samples``, and a consumer reads them in it); its dead letters in any order (a batch
    dead-letters the records it cannot parse before it runs the funnels over the rest - no order
    across a key's dead letters is promised)."""
    out: dict[tuple[str, bytes], list[bytes]] = defaultdict(list)
    for key, sent in run.by_key.items():
        for topic, value in sent:
            out[(topic, key)].append(value)
    return {k: (sorted(v) if k[0] == "dead-letters" else v) for k, v in out.items()}


# (2317, 64, "lagging"): a correction and a malformed record's dead letter of one key in one batch;
# (5172, 2000, "batch-feeds"): label delays summed in another order (both found by a random search)
@pytest.mark.parametrize(("seed", "chunk", "delivery", "fast_core"),
                         [(1, 1, "realtime", True), (2, 37, "realtime", True), (3, 500, "batch-feeds", True),
                          (4, 64, "lagging", True), (2317, 64, "lagging", True), (5172, 2000, "batch-feeds", True),
                          (2, 37, "realtime", False), (4, 64, "lagging", False), (5172, 2000, "batch-feeds", False)])
def test_on_batch_decides_as_on_record(seed: int, chunk: int, delivery: str, fast_core: bool) -> None:
    """Both passes over a batch's records: the compiled one (``_fastjoin.gather``) and the Python
    one it copies (``fast_core=False``, which the A/B benches run)."""
    fetches = _fetches(seed, chunk, delivery)
    one, many = Run(), Run(fast_core)
    for n, (deliver_ms, batch) in enumerate(fetches):
        for run in (one, many):
            if deliver_ms > run.clock.now_ms():
                run.clock.advance(deliver_ms - run.clock.now_ms())
        out: list[Output] = []
        for topic, p, key, value, offset, behind in batch:
            one.join.on_record(topic, p, key, value, behind, out, offset)
        one.collect(out)
        out = []
        many.join.on_batch(batch, out)
        many.collect(out)
        if n % 3 == 2:  # lanes move inside and across batches between two flushes
            one.flush()
            many.flush()
    for run in (one, many):  # everything due, to the end
        run.clock.advance(40 * 86_400_000)
        for _ in range(3):
            run.clock.advance(60_000)
            for p in run.join.parts:
                for s in range(5):
                    run.join.caught_up(p, s)
            run.flush()
    assert sum(len(v) for v in one.by_key.values()) > 1000  # the stream produced plenty
    finals = [v for vs in one.by_key.values() for t, v in vs if t == "samples" and json.loads(v)["kind"] == "final"]
    assert len(finals) > 500
    assert outputs(many) == outputs(one)  # every sample (per key, in order) and dead letter
    assert {p: s._data for p, s in many.stores.items()} == {p: s._data for p, s in one.stores.items()}
    assert {p: s._meta for p, s in many.stores.items()} == {p: s._meta for p, s in one.stores.items()}
    for name in ("aitm_joiner_events_total", "aitm_joiner_duplicate_events_total",
                 "aitm_joiner_dead_letters_total", "aitm_joiner_samples_total", "aitm_joiner_label_delay_seconds_count",
                 "aitm_joiner_label_delay_seconds_bucket"):  # fmt: skip
        assert many.metric(name) == one.metric(name), name
    # the same delays, added up in another order (a batch's at once): equal but for the last bits
    assert many.metric("aitm_joiner_label_delay_seconds_sum") == pytest.approx(
        one.metric("aitm_joiner_label_delay_seconds_sum"), rel=1e-12)
    assert one.metric("aitm_joiner_duplicate_events_total")  # duplicates did come


@pytest.mark.parametrize("fast_core", [True, False])
def test_a_batchs_dead_letters_are_on_records_in_fetch_order(fast_core: bool) -> None:
    """Malformed records, a tombstone and events stamped beyond the future limit (one in the
    compact form the compiled pass reads, one only the strict decoder reads) among good records
    of two partitions: the dead letters of one record at a time - raw bytes, topic, key, offset,
    reason - in fetch order, and the good records joined around them."""
    loose = b'{"event_type": "click", "schema_version": 1, "event_id": "e", "impression_id": "f2", ' + (
        b'"event_time_ms": %d, "bank_id": "b"}' % (T0 + 5 * 3_600_000))  # fmt: skip
    batch: list[BatchRecord] = [
        ("impressions", 0, b"a", event_bytes(0, "a", T0), 0, True),
        ("clicks", 1, b"x", b"[1]", 0, True),  # not an object
        ("impressions", 1, b"f1", event_bytes(0, "f1", T0 + 2 * 3_600_000), 0, True),  # 2 h ahead
        ("clicks", 0, b"a", event_bytes(1, "a", T0 + 1000), 0, True),
        ("clicks", 0, b"t", None, 1, True),  # a tombstone
        ("clicks", 1, b"f2", loose, 1, False),  # 5 h ahead, spaced JSON
        ("impressions", 1, b"b", event_bytes(0, "b", T0), 1, False),
        ("clicks", 1, b"y", b'{"schema_version": 1', 2, False),  # cut short
    ]
    runs = []
    for batched in (False, True):
        run = Run(fast_core)
        out = feed(run, batch, batched)
        dead = [json.loads(o.value) for o in out if o.topic == "dead-letters"]
        runs.append(([(d["source_topic"], d["partition"], d["offset"], d["key"], d["reason"], d["raw"], d["detail"])
                      for d in dead], {p: s._data for p, s in run.stores.items()},
                     run.metric("aitm_joiner_dead_letters_total"), run.metric("aitm_joiner_events_total")))  # fmt: skip
    assert runs[1] == runs[0]
    dead_letters, states, _, _ = runs[1]
    assert [(d[0], d[1], d[2], d[4]) for d in dead_letters] == [
        ("clicks", 1, 0, "malformed_json"), ("impressions", 1, 0, "future"), ("clicks", 0, 1, "malformed_json"),
        ("clicks", 1, 1, "future"), ("clicks", 1, 2, "malformed_json")]  # fmt: skip
    assert dead_letters[3][5] == loose.decode() and "18000 s ahead" in dead_letters[3][6]
    assert sorted(states[0]) == [b"a"] and sorted(states[1]) == [b"b"]


def test_an_impression_and_its_click_in_one_batch_are_one_state_read_and_one_write() -> None:
    reads: list[list[bytes]] = []
    writes: list[bytes] = []

    class Counting(InMemoryStore):
        def get_many(self, keys: list[bytes]) -> list[bytes | None]:
            reads.append(list(keys))
            return super().get_many(keys)

        def put(self, key: bytes, value: bytes, dues: object) -> None:  # type: ignore[override]
            writes.append(key)
            super().put(key, value, dues)  # type: ignore[arg-type]

    store = Counting()
    join = FunnelJoin(FunnelConfig(), JoinTopics(TOPICS_5, "samples", "dead-letters"), lambda p: store,
                      FakeClock(T0), lateness_ms=(0,) * 5, max_future_ms=0)  # fmt: skip
    out: list[Output] = []
    join.on_batch([
        ("impressions", 0, b"a", event_bytes(0, "a", T0), 0, True),
        ("impressions", 0, b"b", event_bytes(0, "b", T0), 1, True),
        ("clicks", 0, b"a", event_bytes(1, "a", T0 + 1000), 0, True),
        ("clicks", 0, b"a", event_bytes(1, "a", T0 + 1000), 1, False),  # a duplicate
    ], out)  # fmt: skip
    assert reads == [[b"a", b"b"]]
    assert sorted(writes) == [b"a", b"b"]
    assert not out


def test_a_funnels_usual_events_in_one_batch_all_go_through_the_compiled_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """An impression with its click and application in one fetch, a click read before its
    impression, a duplicate: the compiled path takes each group's events in turn (the Python
    ``advance`` never runs) and decides as the Python core does - the same samples, dead letters
    and states. A record the compiled path declines (a click after its window) hands the rest of
    its group to the Python core, which still decides the same."""
    from stream.join import driver, fast

    if not fast.AVAILABLE:
        pytest.fail("the compiled join core is not built (pip install -e . builds it)")
    hour = 3_600_000
    usual: list[BatchRecord] = [
        ("impressions", 0, b"a", event_bytes(0, "a", T0), 0, True),
        ("clicks", 0, b"b", event_bytes(1, "b", T0 + 2000), 0, True),  # ahead of its impression
        ("clicks", 0, b"a", event_bytes(1, "a", T0 + 1000), 1, True),
        ("impressions", 0, b"b", event_bytes(0, "b", T0 + 500), 1, True),
        ("applications", 0, b"a", event_bytes(2, "a", T0 + hour), 0, True),
        ("clicks", 0, b"a", event_bytes(1, "a", T0 + 1000), 2, True),  # a duplicate
    ]  # fmt: skip
    declined: list[BatchRecord] = [
        ("impressions", 0, b"c", event_bytes(0, "c", T0 + 1000), 2, True),
        ("clicks", 0, b"c", event_bytes(1, "c", T0 + 3 * hour), 3, True),  # after its 1 h window: late
        ("applications", 0, b"c", event_bytes(2, "c", T0 + 4 * hour), 1, False),  # held: no click counts
    ]  # fmt: skip
    calls: list[int] = []
    real_advance = driver.advance

    def counted(*args: object) -> object:
        calls.append(1)
        return real_advance(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(driver, "advance", counted)
    results = []
    for fast_core in (True, False):
        run = Run()
        run.registry = CollectorRegistry()
        run.join = FunnelJoin(FunnelConfig(), JoinTopics(TOPICS_5, "samples", "dead-letters"),
                              lambda p, run=run: run.stores.setdefault(p, InMemoryStore()), run.clock,
                              JoinerMetrics(run.registry), lateness_ms=(0,) * 5, max_future_ms=0,
                              fast_core=fast_core)  # fmt: skip
        calls.clear()
        out: list[Output] = []
        run.join.on_batch(usual, out)
        if fast_core:
            assert calls == []  # every event of every group: the compiled path
        else:
            assert len(calls) == len(usual)
        run.join.on_batch(declined, out)
        if fast_core:
            assert len(calls) == 2  # the late click and the application after it: the Python core
        run.collect(out)
        results.append((dict(run.by_key), {p: s._data for p, s in run.stores.items()},
                        run.metric("aitm_joiner_duplicate_events_total")))  # fmt: skip
    assert results[0] == results[1]
    by_key, states, dups = results[0]
    assert sorted(states[0]) == [b"a", b"b", b"c"]
    assert sum(dups.values()) == 1
    dead = [json.loads(v) for t, v in by_key[b"c"] if t == "dead-letters"]
    assert [(d["reason"], d["source_topic"]) for d in dead] == [("late", "clicks")]  # its application: held


def test_a_record_is_judged_by_its_own_topic_as_the_records_before_it_in_the_batch_left_it() -> None:
    """A click read after a later click of its topic moved the click lane past its funnel's final
    arrived too late (``late``), in a batch exactly as one record at a time."""
    batch: list[BatchRecord] = [
        ("impressions", 0, b"a", event_bytes(0, "a", T0), 0, False),
        ("impressions", 0, b"b", event_bytes(0, "b", T0 + 90 * 60_000), 1, True),
        ("impressions", 0, b"c", event_bytes(0, "c", T0 + 3 * 3_600_000), 2, True),
        ("impressions", 0, b"d", event_bytes(0, "d", T0 + 3 * 3_600_000), 3, False),  # the clock: T0 + 3 h
        ("clicks", 0, b"b", event_bytes(1, "b", T0 + 2 * 3_600_000), 0, True),  # lane 1 -> T0 + 2 h
        ("clicks", 0, b"a", event_bytes(1, "a", T0 + 30 * 60_000), 1, False),  # a's final was T0 + 1 h
    ]
    results = []
    for batched in (False, True):
        run = Run()
        run.join = FunnelJoin(FunnelConfig(), JoinTopics(TOPICS_5, "samples", "dead-letters"),
                              lambda p, run=run: run.stores.setdefault(p, InMemoryStore()), run.clock,
                              lateness_ms=(0,) * 5, max_future_ms=0)  # fmt: skip
        run.collect(feed(run, batch, batched))
        results.append(dict(run.by_key))
    assert results[0] == results[1]
    dead = [json.loads(v) for t, v in results[1][b"a"] if t == "dead-letters"]
    assert [(d["reason"], d["source_topic"]) for d in dead] == [("late", "clicks")]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=6))
def test_features_json_is_the_json_modules_compact_form_byte_for_byte(feats: dict[str, str]) -> None:
    """Printable ASCII from msgspec, everything else (non-ASCII, DEL, control characters, lone
    surrogates) as the json module writes it: the state and the samples keep the same bytes."""
    assert features_json(feats) == json.dumps(feats, separators=(",", ":")).encode()


def test_features_json_of_the_characters_msgspec_writes_otherwise() -> None:
    for text in ("caf\u00e9", "a\x7fb", "\u2028", "\udc80", "\x00\x1f", "/\\\""):
        assert features_json({"k": text}) == json.dumps({"k": text}, separators=(",", ":")).encode(), text


@pytest.mark.parametrize("batched", [True, False], ids=["on_batch", "on_record"])
def test_the_last_event_gauge_is_the_time_the_join_last_took_records(batched: bool) -> None:
    """``aitm_joiner_last_event_timestamp_seconds``: unset before any record, then the clock's time
    when the join last took records (what a stall alert and the joiner bench read)."""
    run = Run()
    gauge = "aitm_joiner_last_event_timestamp_seconds"
    assert run.metric(gauge) == {(): 0.0}
    fetches = _fetches(seed=3, chunk=20, delivery="realtime")[:3]
    for i, (_, batch) in enumerate(fetches):
        run.clock.advance(1_500 + i)
        feed(run, batch, batched)
        assert run.metric(gauge) == {(): run.clock.now_ms() / 1000}
