"""Shared helpers for the joiner tests: run a simulated stream, check samples against truth."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from simulators.faults import FaultConfig, SimulatedStream, expected_dead_letters, missing_dead_letters
from simulators.funnel import FunnelSimulator, SimConfig
from stream.contract.samples import Sample, parse_sample

TOPICS_5 = ("impressions", "clicks", "applications", "approvals", "activations")
FAULTS = FaultConfig(duplicate=0.01, out_of_order=0.01, malformed=0.005, illegal=0.005, late=0.005)


def small_stream(seed: int = 1, per_day: int = 2000, days: int = 2, tail_days: int = 21,
                 delivery: str = "realtime") -> SimulatedStream:
    sim = FunnelSimulator(SimConfig(seed=seed, impressions_per_day=per_day))
    return SimulatedStream(sim, days=days, faults=FAULTS, tail_days=tail_days, tail_impressions_per_day=200,
                           delivery=delivery)  # fmt: skip


@dataclass
class Collected:
    samples: list[Sample] = field(default_factory=list)
    dead: list[dict] = field(default_factory=list)
    raw_samples: list[bytes] = field(default_factory=list)

    def add(self, topic: str, value: bytes, samples_topic: str) -> None:
        if topic == samples_topic:
            self.samples.append(parse_sample(value))
            self.raw_samples.append(value)
        else:
            self.dead.append(json.loads(value))

    def finals(self) -> dict[str, Sample]:
        """Final samples after dedupe by (impression_id, seq); raises on conflicting duplicates."""
        out: dict[str, Sample] = {}
        for s in self.samples:
            if s.kind != "final":
                continue
            prev = out.get(s.impression_id)
            if prev is not None and (prev.labels, prev.seq) != (s.labels, s.seq):
                raise AssertionError(f"conflicting finals for {s.impression_id}: {prev.labels} vs {s.labels}")
            out[s.impression_id] = s
        return out

    def repeated_finals(self) -> int:
        """Final records beyond one per impression (identical re-emissions)."""
        return sum(1 for s in self.samples if s.kind == "final") - len(self.finals())


STEP_NAMES = ("impression", "click", "application", "approval", "activation")


def check_against_truth(stream: SimulatedStream, got: Collected, topics: tuple[str, ...] = TOPICS_5) -> None:
    """The simulator's answer key (from the documented rules, never from the joiner): every
    required final with its labels, no final for what has no impression, every required dead
    letter with its reason, and no dead letter the key does not expect."""
    finals = got.finals()
    wrong, missing, invented = [], [], []
    for row in stream.truth:
        s = finals.get(row.impression_id)
        if row.final_labels is None:
            if s is not None:
                invented.append(row.impression_id)
        elif s is None:
            if row.final_required:
                missing.append(row.impression_id)
        elif tuple(s.labels) != tuple(row.final_labels):
            wrong.append((row.impression_id, s.labels, row.final_labels, row.faults))
    assert not missing, f"{len(missing)} impressions have no final sample, e.g. {missing[:5]}"
    assert not wrong, f"{len(wrong)} final labels differ from the answer key, e.g. {wrong[:5]}"
    assert not invented, f"{len(invented)} finals for impressions that never came, e.g. {invented[:5]}"
    step_of = dict(zip(topics, STEP_NAMES, strict=True))
    seen = {(d["key"], step_of[d["source_topic"]], d["reason"]) for d in got.dead}
    absent = missing_dead_letters(stream.dead_letters, seen)
    unexplained = sorted(seen - expected_dead_letters(stream.dead_letters))
    assert not absent, f"{len(absent)} expected dead letters missing, e.g. {absent[:5]}"
    assert not unexplained, f"{len(unexplained)} dead letters the answer key does not expect, e.g. {unexplained[:5]}"


# --- an in-process driver of FunnelJoin on a fake clock ---------------------------------------


class JoinDriver:
    """Feeds records to a ``FunnelJoin`` in delivery order, as the joiner does: the clock follows
    the delivery time (wall time = event time, a real-time pipeline), sweeps when due and commits
    them, collects samples and dead letters. ``restart()`` drops everything in memory and goes on
    over the same stores (RocksDB under ``db_dir``, or the same in-memory stores)."""

    def __init__(self, cfg: object | None = None, db_dir: object | None = None, start_ms: int = 0,
                 partitions: int = 1, samples_encoding: str = "json", **join_kw: object) -> None:
        from stream.join.driver import JoinTopics
        from stream.join.funnel import FunnelConfig
        from stream.ops.clock import FakeClock

        self.cfg = cfg or FunnelConfig()
        self.topics = JoinTopics(TOPICS_5, "samples", "dead-letters", samples_encoding)  # type: ignore[arg-type]
        self.db_dir = db_dir
        self.stores: dict[int, object] = {}
        self.clock = FakeClock(start_ms)
        self.partitions = partitions
        self.join_kw = join_kw
        self.got = Collected()
        self.restarts = 0
        self.join = self._new_join()

    def _store(self, p: int):  # type: ignore[no-untyped-def]
        from pathlib import Path

        from stream.join.rocksdb_store import RocksDBStore
        from stream.join.store import InMemoryStore

        if p not in self.stores:
            self.stores[p] = InMemoryStore() if self.db_dir is None else RocksDBStore(Path(str(self.db_dir)) / f"p{p}")
        return self.stores[p]

    def _new_join(self):  # type: ignore[no-untyped-def]
        from stream.join.driver import FunnelJoin

        return FunnelJoin(self.cfg, self.topics, self._store, self.clock, **self.join_kw)  # type: ignore[arg-type]

    def partition_of(self, key: bytes) -> int:
        """Kafka's default partition of the key (the simulator's partition stall uses it too)."""
        from simulators.faults import kafka_partition

        return kafka_partition(key, self.partitions)

    def feed(
        self, step: int, key: bytes, value: bytes, deliver_ms: int | None = None, behind: bool = False,
        caught_up: tuple[bool, ...] = (True,) * 5,
    ) -> None:
        """One record, delivered at ``deliver_ms`` (the clock moves there). ``behind``: more records
        of its topic follow (a backlog); ``caught_up``: per topic, is it read to its end."""
        if deliver_ms is not None and deliver_ms > self.clock.now_ms():
            self.clock.advance(deliver_ms - self.clock.now_ms())
        out: list = []
        p = self.partition_of(key)
        self.join.on_record(TOPICS_5[step], p, key, value, behind, out)
        self._collect(out)
        self.tick(caught_up)

    def feed_batch(self, records: list[tuple[int, bytes, bytes, int]], behind: bool = False) -> None:
        """A fetched batch, ``(step, key, value, deliver_ms)`` each, in delivery order, through
        ``on_batch`` (the clock at the last record's delivery: it was fetched then); then a tick."""
        last = max(r[3] for r in records)
        if last > self.clock.now_ms():
            self.clock.advance(last - self.clock.now_ms())
        out: list = []
        batch = [(TOPICS_5[step], self.partition_of(key), key, value, None, behind)
                 for step, key, value, _ in records]  # fmt: skip
        self.join.on_batch(batch, out)
        self._collect(out)
        self.tick()

    def tick(self, caught_up: tuple[bool, ...] = (True,) * 5) -> None:
        """Report what is read to its end, and sweep what is due."""
        for p in range(self.partitions):
            for s in range(5):
                self.join.caught_up(p, s, caught_up[s])
            if self.join.sweep_due(p):
                out: list = []
                self.join.sweep(p, out)
                wm = self.join.take_sweep(p)
                self._collect(out)  # the outputs are out: the sweep can be stored
                if wm is not None:
                    self.join.persist_swept(p, wm)

    def idle(self, ms: int, step_ms: int = 1000) -> None:
        """Let wall time pass with nothing delivered (topics go idle)."""
        end = self.clock.now_ms() + ms
        while self.clock.now_ms() < end:
            self.clock.advance(min(step_ms, end - self.clock.now_ms()))
            self.tick()

    def restart(self) -> None:
        if self.db_dir is not None:
            for s in self.stores.values():
                s.close()  # type: ignore[attr-defined]
            self.stores.clear()
        self.restarts += 1
        self.join = self._new_join()

    def _collect(self, out: list) -> None:
        for o in out:
            self.got.add(o.topic, o.value, "samples")

    def finals(self) -> dict[str, list]:
        """Every final sample per impression, repeats included."""
        by: dict[str, list] = {}
        for s in self.got.samples:
            if s.kind == "final":
                by.setdefault(s.impression_id, []).append(s)
        return by

    def dead_reasons(self) -> dict[str, list[str]]:
        by: dict[str, list[str]] = {}
        for d in self.got.dead:
            by.setdefault(d["key"], []).append(d["reason"])
        return by


def feed_in_fetches(d: JoinDriver, stream: SimulatedStream, fetch_seed: int, restart_at: float) -> None:
    """The stream's records as a consumer fetches them - batches of 1, 7, 50 or 400 through
    ``on_batch``, drawn with ``fetch_seed`` - with a restart over the same stores once
    ``restart_at`` of them are read; then every topic goes idle (the stream has ended)."""
    import random

    from stream.contract.events import STEP_INDEX

    records = list(stream)
    fetch = random.Random(fetch_seed)
    restart_after = int(len(records) * restart_at)
    i, restarted = 0, False
    while i < len(records):
        n = fetch.choice((1, 7, 50, 400))
        d.feed_batch([(STEP_INDEX[r.step], r.key, r.value, r.deliver_ms) for r in records[i : i + n]])
        i += n
        if not restarted and i >= restart_after:
            d.restart()
            restarted = True
    d.idle(120_000)


def event_bytes(step: int, iid: str, t_ms: int, bank: str = "bank_1") -> bytes:
    from stream.contract.events import Event, encode_event

    return encode_event(Event(step, f"{iid}/{step}", iid, t_ms, bank, {"f": "v"} if step == 0 else None))
