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
        obj = sample_object(rec.value) if rec.topic == self.samples_topic else json.loads(rec.value)
        if rec.topic == self.samples_topic:
            self.sampled.add(obj["impression_id"])
            if obj["kind"] == "final":
                self.finals[obj["impression_id"]].add(tuple(obj["labels"]))
                self.final_records += 1
        elif rec.topic == self.scores_topic:
            self.scored[obj["impression_id"]] += 1
        else:
            self.dead.append(obj)


def sample_object(value: bytes) -> dict[str, Any]:
    """A samples record of either encoding as its JSON object (schema_version 1). A binary one is
    read as the README documents it: a MessagePack array (first byte 0x90-0x9f) [2, impression_id,
    bank_id, event_time_ms, [names], [values], flags (bit t: label of task t, bit 4 + t: task t
    mature), kind (0 first, 1 correction, 2 final), elapsed_ms, seq, watermark_ms, policy]."""
    if value[0] & 0xF0 != 0x90:
        return dict(json.loads(value))
    items = msgspec.msgpack.decode(value)
    assert items[0] == 2 and len(items) == 12, f"binary sample of schema version {items[0]}, {len(items)} items"
    names, values, flags = items[4], items[5], items[6]
    assert len(names) == len(values) == len(set(names)), (names, values)
    return {
        "schema_version": 1, "impression_id": items[1], "bank_id": items[2], "event_time_ms": items[3],
        "features": dict(zip(names, values, strict=True)), "labels": [flags >> t & 1 for t in range(4)],
        "mature": [bool(flags >> (4 + t) & 1) for t in range(4)], "kind": ("first", "correction", "final")[items[7]],
        "elapsed_ms": items[8], "seq": items[9], "watermark_ms": items[10], "policy": items[11],
    }  # fmt: skip


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
