"""Every process's Prometheus metrics, each class built from an injected ``CollectorRegistry``.

Names carry the ``aitm_`` prefix and their unit; labels are low-cardinality (never an id).
Tests build a fresh registry and read values with ``registry.get_sample_value(...)``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# label delay spans seconds (a click) to weeks (an activation at T+14)
_DELAY_BUCKETS = (60, 600, 1800, 3600, 6 * 3600, 86_400, 3 * 86_400, 7 * 86_400, 14 * 86_400, 21 * 86_400)


class JoinerMetrics:
    """The label joiner's metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "aitm_joiner_events", "Event records consumed, by the step their topic carries",
            ["type"], registry=registry,
        )
        self.duplicates = Counter(
            "aitm_joiner_duplicate_events", "Events ignored as duplicates (idempotent)", ["type"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "aitm_joiner_dead_letters", "Records sent to the dead-letter topic, by reason", ["reason"],
            registry=registry,
        )
        self.samples = Counter(
            "aitm_joiner_samples", "Training samples emitted, by kind", ["kind"], registry=registry,
        )
        self.open_funnels = Gauge(
            "aitm_joiner_open_funnels", "Funnel states held (open or retained after final)", registry=registry,
        )
        self.label_delay = Histogram(
            "aitm_joiner_label_delay_seconds", "Event time from impression to final labels",
            buckets=_DELAY_BUCKETS, registry=registry,
        )
        self.watermark_lag = Gauge(
            "aitm_joiner_watermark_lag_seconds",
            "Newest event time seen minus the watermark (worst partition)", registry=registry,
        )
        self.store_size = Gauge(
            "aitm_joiner_store_size_bytes", "Bytes on disk of the joiner's local state", registry=registry,
        )
