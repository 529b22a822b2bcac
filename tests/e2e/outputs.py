"""What the pipeline published, and what it must publish: the tests' own reading of the output
topics (their documented schemas, parsed with ``json`` and, for binary samples, ``msgspec`` -
no product code) and their own
expectations from the simulator's answer key. The chaos bench has its own (``bench.chaos``);
the tests do not borrow it, so a mistake there cannot hide one in the product."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import msgspec

from simulators.faults import SimulatedStream


class Outputs:
    """Feed it every record of the samples, scores and dead-letters topics (``TopicTail``)."""

    def __init__(self, samples_topic: str, scores_topic: str) -> None:
        self.samples_topic, self.scores_topic = samples_topic, scores_topic
        self.sampled: set[str] = set()
        self.finals: dict[str, set[tuple[int, ...]]] = defaultdict(set)  # impression -> final label tuples
        self.final_records = 0
        self.scored: Counter[str] = Counter()
        self.dead: list[dict[str, Any]] = []

    def __call__(self, rec: Any) -> None:
        obj = _sample_of(rec.value) if rec.topic == self.samples_topic else json.loads(rec.value)
        if rec.topic == self.samples_topic:
            self.sampled.add(obj["impression_id"])
            if obj["kind"] == "final":
                self.finals[obj["impression_id"]].add(tuple(obj["labels"]))
                self.final_records += 1
        elif rec.topic == self.scores_topic:
            self.scored[obj["impression_id"]] += 1
        else:
            self.dead.append(obj)


def _sample_of(value: bytes) -> dict[str, Any]:
    """A samples record of either encoding: JSON (schema_version 1), or binary as the README
    documents it: a MessagePack array (first byte 0x90-0x9f) [2, impression_id, bank_id,
    event_time_ms, names, values, flags (bit t: label of task t), kind (0 first, 1 correction,
    2 final), ...]."""
    if value[0] & 0xF0 != 0x90:
        return dict(json.loads(value))
    items = msgspec.msgpack.decode(value)
    assert items[0] == 2, f"binary sample of schema version {items[0]}"
    labels = [items[6] >> t & 1 for t in range(4)]
    return {"impression_id": items[1], "labels": labels, "kind": ("first", "correction", "final")[items[7]]}


def must_label(stream: SimulatedStream) -> dict[str, tuple[int, ...]]:
    """Impressions whose final labels must be out by the end, with those labels (the answer key)."""
    return {t.impression_id: tuple(t.final_labels) for t in stream.truth if t.final_required and t.final_labels is not None}


def must_score(stream: SimulatedStream) -> set[str]:
    """Impressions whose impression record reached the impressions topic intact: every one but a
    ``malformed`` impression, and the impressions an ``illegal`` click stands without (the
    simulator drops the predecessor of the record it makes illegal: simulators/faults.py)."""
    broken = {f.impression_id for f in stream.faults if f.kind == "malformed" and f.step == "impression"}
    dropped = {f.impression_id for f in stream.faults if f.kind == "illegal" and f.step == "click"}
    return {t.impression_id for t in stream.truth} - broken - dropped
