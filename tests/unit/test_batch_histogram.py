"""``stream.ops.metrics.BatchHistogram`` exposes what prometheus_client's own ``Histogram`` does."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from stream.ops.metrics import _DELAY_BUCKETS, BatchHistogram, JoinerMetrics


def _exposition(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_the_same_values_give_the_same_exposition_as_a_histogram(batch: int) -> None:
    rng = random.Random(batch)
    bounds = [float(b) for b in _DELAY_BUCKETS]
    # on every bound, just around it, below the first and above the last
    values = [*bounds, *(b * (1 + 1e-12) for b in bounds), 0.0, 0.5, 1e9] + [rng.uniform(0, 3e6) for _ in range(500)]
    rng.shuffle(values)
    reference, batched = CollectorRegistry(), CollectorRegistry()
    hist = Histogram("aitm_x_seconds", "x", buckets=_DELAY_BUCKETS, registry=reference)
    ours = BatchHistogram("aitm_x_seconds", "x", _DELAY_BUCKETS, batched)
    for v in values:
        hist.observe(v)
    for i in range(0, len(values), batch):
        ours.observe_many(values[i:i + batch])
    assert _exposition(batched) == _exposition(reference)


def test_the_joiner_label_delay_is_read_by_name_as_before() -> None:
    r = CollectorRegistry()
    m = JoinerMetrics(r)
    m.label_delay.observe_many([30.0, 120.0])
    m.label_delay.observe(86_400.0 * 30)
    assert r.get_sample_value("aitm_joiner_label_delay_seconds_count") == 3
    assert r.get_sample_value("aitm_joiner_label_delay_seconds_sum") == 150.0 + 86_400.0 * 30
    assert r.get_sample_value("aitm_joiner_label_delay_seconds_bucket", {"le": "60.0"}) == 1
    assert r.get_sample_value("aitm_joiner_label_delay_seconds_bucket", {"le": "+Inf"}) == 3


def test_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        BatchHistogram("aitm_y_seconds", "y", (10, 1), CollectorRegistry())
