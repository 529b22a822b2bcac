"""The join driver on a simulated stream with faults, RocksDB stores, no Kafka: labels = truth."""

from __future__ import annotations

import zlib
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from stream.clock import FakeClock
from stream.funnel import FunnelConfig
from stream.join import FunnelJoin, JoinTopics, Output
from stream.metrics import JoinerMetrics
from stream.rocksdb_store import RocksDBStore
from stream.store import InMemoryStore, LabelStore
from tests.joinhelpers import Collected, check_against_truth, small_stream

TOPICS = JoinTopics(("impressions", "clicks", "applications", "approvals", "activations"), "samples", "dead-letters")
STEP_TOPIC = dict(zip(("impression", "click", "application", "approval", "activation"), TOPICS.events, strict=True))


@pytest.mark.parametrize("backend", ["memory", "rocksdb"])
def test_simulated_stream_labels_equal_truth(backend: str, tmp_path: Path) -> None:
    stream = small_stream(seed=3, per_day=1000)
    stores: dict[int, LabelStore] = {}

    def store_for(p: int) -> LabelStore:
        return stores.setdefault(p, InMemoryStore() if backend == "memory" else RocksDBStore(tmp_path / f"p{p}"))

    registry = CollectorRegistry()
    clock = FakeClock()
    join = FunnelJoin(FunnelConfig(), TOPICS, store_for, clock, JoinerMetrics(registry), sweep_interval_s=0.05)
    got = Collected()
    for rec in stream:
        out: list[Output] = []
        p = zlib.crc32(rec.key) % 4
        join.on_record(STEP_TOPIC[rec.step], p, rec.key, rec.value, False, out)
        clock.advance(10)
        if join.sweep_due(p):
            join.sweep(p, out)
            join.commit_sweep(p)
        for o in out:
            got.add(o.topic, o.value, TOPICS.samples)
    check_against_truth(stream, got)
    kinds = Counter(s.kind for s in got.samples)
    assert kinds["first"] > 0 and kinds["final"] > 0
    assert registry.get_sample_value("aitm_joiner_samples_total", {"kind": "final"}) == kinds["final"]
    assert registry.get_sample_value("aitm_joiner_dead_letters_total", {"reason": "malformed_json"}) >= 1
    seqs: dict[str, list[int]] = {}
    for s in got.samples:
        seqs.setdefault(s.impression_id, []).append(s.seq)
    assert all(v == sorted(set(v)) for v in seqs.values()), "seq must increase per impression"
