"""Shared helpers for the joiner tests: run a simulated stream, check samples against truth."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from simulators.faults import FaultConfig, SimulatedStream
from simulators.funnel import FunnelSimulator, SimConfig
from stream.samples import Sample, parse_sample

FAULTS = FaultConfig(duplicate=0.01, out_of_order=0.01, malformed=0.005, illegal=0.005, late=0.005)


def small_stream(seed: int = 1, per_day: int = 2000, days: int = 2, tail_days: int = 19) -> SimulatedStream:
    sim = FunnelSimulator(SimConfig(seed=seed, impressions_per_day=per_day))
    return SimulatedStream(sim, days=days, faults=FAULTS, tail_days=tail_days, tail_impressions_per_day=200)


@dataclass
class Collected:
    samples: list[Sample] = field(default_factory=list)
    dead: list[dict] = field(default_factory=list)

    def add(self, topic: str, value: bytes, samples_topic: str) -> None:
        if topic == samples_topic:
            self.samples.append(parse_sample(value))
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


def check_against_truth(stream: SimulatedStream, got: Collected) -> None:
    finals = got.finals()
    wrong, missing = [], []
    for row in stream.truth:
        if row.tail or row.corrupted:
            continue
        s = finals.get(row.impression_id)
        if s is None:
            missing.append(row.impression_id)
        elif tuple(s.labels) != tuple(row.labels):
            wrong.append((row.impression_id, s.labels, row.labels, row.faults))
    assert not missing, f"{len(missing)} matured impressions have no final sample, e.g. {missing[:5]}"
    assert not wrong, f"{len(wrong)} final labels differ from the truth, e.g. {wrong[:5]}"
    dead = {(d["key"], json.loads(d["raw"])["event_id"] if _is_json(d["raw"]) else None, d["reason"]) for d in got.dead}
    dead_by_key: dict[str, set[str]] = {}
    for d in got.dead:
        dead_by_key.setdefault(d["key"], set()).add(d["reason"])
    bad = []
    for f in stream.faults:
        if f.expected_reason is None:
            continue
        if f.expected_reason not in dead_by_key.get(f.impression_id, set()):
            bad.append((f.kind, f.impression_id, f.step, f.expected_reason, dead_by_key.get(f.impression_id)))
    # after_window activations of tail or very late impressions may fall beyond the stream's end
    assert not bad, f"{len(bad)} faults not dead-lettered with the right reason, e.g. {bad[:5]}"
    del dead


def _is_json(raw: object) -> bool:
    if not isinstance(raw, str):
        return False
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


def unique(xs: Iterable[str]) -> list[str]:
    return sorted(set(xs))
