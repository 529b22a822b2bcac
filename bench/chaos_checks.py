"""What the chaos bench checks, apart from how it runs: the ledger of what came out of the
pipeline (samples, scores, dead letters), the expectations from the simulator's answer key, the
repeated finals and each final's delay in event time."""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from simulators.faults import Record, SimulatedStream, expected_dead_letters
from stream.contract.events import STEPS
from stream.contract.samples import parse_sample
from stream.ops.settings import Settings

LANES = ("activated", "clicks", "applications", "approvals", "activations")  # what each final waits for
# a final emitted again must have been first emitted this long (wall) before a kill of the joiner
# or less: its flush was in flight, its acks not yet recorded (generous for a loaded machine)
REPEAT_WINDOW_S = 15.0


class Ledger:
    """What came out of the pipeline, collected from the samples, scores and dead-letters topics."""

    def __init__(self, topics: dict[str, str], event_topics: tuple[str, ...] = ()) -> None:
        self.topics = topics
        self.step_of = dict(zip(event_topics, STEPS, strict=True)) if event_topics else {}
        self.finals: dict[str, set[tuple[int, ...]]] = defaultdict(set)
        self.final_records = 0
        self.final_ms: dict[str, list[int]] = defaultdict(list)  # when each final record was produced
        self.sampled: set[str] = set()
        self.scored: Counter[str] = Counter()
        self.dead: list[dict[str, Any]] = []
        self.final_wm: dict[str, tuple[int, int]] = {}  # (producer time, lane watermark) of the first final

    def __call__(self, rec: Any) -> None:
        if rec.topic == self.topics["samples"]:
            s = parse_sample(rec.value)
            self.sampled.add(s.impression_id)
            if s.kind == "final":
                self.final_ms[s.impression_id].append(rec.timestamp)
                self.finals[s.impression_id].add(tuple(s.labels))
                first = self.final_wm.get(s.impression_id)
                if first is None or rec.timestamp < first[0]:
                    self.final_wm[s.impression_id] = (rec.timestamp, s.watermark_ms)
                self.final_records += 1
        elif rec.topic == self.topics["scores"]:
            self.scored[json.loads(rec.value)["impression_id"]] += 1
        else:
            self.dead.append(json.loads(rec.value))

    def dead_keys(self) -> set[tuple[str, str, str]]:
        """(impression id, step, reason) of every dead letter."""
        return {(d.get("key") or "", self.step_of.get(d["source_topic"], d["source_topic"]), d["reason"]) for d in self.dead}


def expectations(stream: SimulatedStream) -> dict[str, Any]:
    """From the simulator's answer key: impressions whose final labels must be out by the end
    (with those labels), every dead letter it expects, and impressions that must be scored."""
    labelled = {t.impression_id: t.final_labels for t in stream.truth if t.final_required}
    malformed_impressions = {
        f.impression_id for f in stream.faults if f.kind == "malformed" and f.step == "impression"
    }
    dropped_impressions = {
        f.impression_id for f in stream.faults if f.kind == "illegal" and f.step == "click"
    }
    scorable = {t.impression_id for t in stream.truth} - malformed_impressions - dropped_impressions
    dead = expected_dead_letters(stream.dead_letters)
    dead_required = [d for d in stream.dead_letters if d.required]
    return {"labelled": labelled, "scorable": scorable, "dead": dead, "dead_required": dead_required}


def repeats_after_kills(ledger: Ledger, joiner_kills_ms: list[int]) -> dict[str, Any]:
    """Repeated finals (identical re-emissions), and those whose first copy was not produced in the
    ``REPEAT_WINDOW_S`` before a kill of the joiner (a repeat without a crash to explain it)."""
    window = REPEAT_WINDOW_S * 1000
    repeated = unexplained = 0
    for times in list(ledger.final_ms.values()):
        for before, again in itertools.pairwise(sorted(times)):
            repeated += 1
            if not any(before <= k <= min(again, before + window) for k in joiner_kills_ms):
                unexplained += 1
    return {
        "repeated_finals": repeated,
        "repeated_finals_without_a_kill": unexplained,
        "repeat_window_s": REPEAT_WINDOW_S,
    }


def final_delays(stream: SimulatedStream, ledger: Ledger, settings: Settings) -> dict[str, Any]:
    """For each final: how far the topic it waited for had got past the funnel's final time
    when the final went out - the final's lane watermark plus that lane's allowed lateness, minus
    the final time (for an activated funnel, final at once: how far the impressions had got past
    the activation). Event time, so it is what the rules cost (the allowed lateness, a sparse or
    idle topic, a batch file, the sweep interval) and not this run's reading order of the topics."""
    truth = {t.impression_id: t for t in stream.truth}
    lateness = settings.joiner_lateness_ms()
    by_lane: dict[str, list[float]] = defaultdict(list)
    every: list[float] = []
    for iid, (_, wm) in list(ledger.final_wm.items()):
        row = truth.get(iid)
        if row is None or row.final_at_ms is None or row.final_lane is None or not row.final_required:
            continue
        delay = (wm + lateness[row.final_lane] - row.final_at_ms) / 1000.0
        every.append(delay)
        by_lane[LANES[row.final_lane]].append(delay)

    def q(xs: list[float]) -> dict[str, float]:
        a = np.asarray(xs)
        return {"p50": round(float(np.percentile(a, 50)), 1), "p99": round(float(np.percentile(a, 99)), 1),
                "n": len(xs)}  # fmt: skip

    return {**q(every), "by_lane": {lane: q(xs) for lane, xs in sorted(by_lane.items())}} if every else {}


def realtime_final_delays(records: list[Record], stream: SimulatedStream, settings: Settings) -> dict[str, Any]:
    """``final_delay_s`` at real-time pace: the same records through the same ``FunnelJoin``, in
    process, the clock following their delivery times (wall time = event time, sweeps every
    ``JOINER_SWEEP_INTERVAL_MS``, idle after ``JOINER_IDLE_TIMEOUT_MS`` as configured for
    production). The chaos run itself goes hours of simulated time a second, where one sweep
    interval or a catch-up after a kill is hours of event time."""
    from bench.paced_join import join_at_delivery_pace
    from stream.join.app import join_topics
    from stream.join.driver import Output

    prod = Settings(kafka_bootstrap_servers=settings.kafka_bootstrap_servers)  # production defaults
    topics = join_topics(prod)
    final_wm: dict[str, int] = {}

    def collect(out: list[Output]) -> None:
        for o in out:
            if o.topic == topics.samples:  # either encoding (SAMPLES_ENCODING): no byte-level filter
                s = parse_sample(o.value)
                if s.kind == "final":
                    final_wm.setdefault(s.impression_id, s.watermark_ms)

    join_at_delivery_pace(records, prod, collect)
    ledger = Ledger({"samples": topics.samples, "scores": ""})
    ledger.final_wm = {iid: (0, wm) for iid, wm in final_wm.items()}
    return final_delays(stream, ledger, prod)
