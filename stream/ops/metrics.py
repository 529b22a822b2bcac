"""Every process's Prometheus metrics, each class built from an injected ``CollectorRegistry``.

Names carry the ``aitm_`` prefix and their unit; labels are low-cardinality (never an id).
Tests build a fresh registry and read values with ``registry.get_sample_value(...)``.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


def process_registry() -> CollectorRegistry:
    """A fresh registry for one process's ``/metrics``, with the client's standard collectors on it:
    ``process_*`` (CPU seconds, resident memory, open fds, start time), ``python_info`` and
    ``python_gc_*``. (The client registers these on its global registry, which no process here
    serves: every process builds its own registry and passes it to its metrics classes.)"""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class BatchHistogram(Collector):
    """A histogram observed a batch of values at a time: what ``Histogram`` exposes (``_bucket``
    cumulative by ``le``, ``_count``, ``_sum``), kept as plain counts under one lock per batch.
    ``Histogram.observe`` walks its bounds in Python and takes two locks per value (~1 us; the
    joiner observes each final sample's delay: issue 16, round 9). A registry collector, the
    client's documented way to expose values kept elsewhere.

    >>> from prometheus_client import CollectorRegistry
    >>> r = CollectorRegistry()
    >>> h = BatchHistogram("x_seconds", "x", (1, 10), r)
    >>> h.observe_many([0.5, 1, 3, 20])
    >>> [r.get_sample_value("x_seconds_bucket", {"le": le}) for le in ("1.0", "10.0", "+Inf")]
    [2.0, 3.0, 4.0]
    >>> r.get_sample_value("x_seconds_count"), r.get_sample_value("x_seconds_sum")
    (4.0, 24.5)
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = tuple(float(b) for b in buckets)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"{name}: bucket bounds must be strictly increasing, got {buckets}")
        self._counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Iterable[float]) -> None:
        """Count each value in the first bucket whose bound is >= it (Prometheus's ``le``); the
        sum adds them in turn, as ``observe`` one at a time would (the same float)."""
        bounds = self.bounds
        values = list(values)
        local = [0] * len(self._counts)
        for v in values:
            local[bisect_left(bounds, v)] += 1
        with self._lock:
            counts = self._counts
            for i, n in enumerate(local):
                if n:
                    counts[i] += n
            total = self._sum
            for v in values:
                total += v
            self._sum = total

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, n in zip((*(floatToGoString(b) for b in self.bounds), "+Inf"), counts, strict=True):
            cumulative += n
            buckets.append((bound, float(cumulative)))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, buckets=[("+Inf", 0.0)], sum_value=0.0)


# label delay spans seconds (a click) to weeks (an activation at T+14)
_DELAY_BUCKETS = (60, 600, 1800, 3600, 6 * 3600, 86_400, 3 * 86_400, 7 * 86_400, 14 * 86_400, 21 * 86_400)


class JoinerMetrics:
    """The label joiner's metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "aitm_joiner_events",
            "Event records consumed, by the step their topic carries",
            ["type"],
            registry=registry,
        )
        self.duplicates = Counter(
            "aitm_joiner_duplicate_events",
            "Events ignored as duplicates (idempotent)",
            ["type"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "aitm_joiner_dead_letters",
            "Records sent to the dead-letter topic, by reason",
            ["reason"],
            registry=registry,
        )
        self.samples = Counter(
            "aitm_joiner_samples",
            "Training samples emitted, by kind",
            ["kind"],
            registry=registry,
        )
        self.last_event = Gauge(
            "aitm_joiner_last_event_timestamp_seconds",
            "Unix time the joiner last finished joining event records (a stalled joiner falls behind time())",
            registry=registry,
        )
        self.open_funnels = Gauge(
            "aitm_joiner_open_funnels",
            "Funnel states held (open or retained after final)",
            registry=registry,
        )
        self.label_delay = BatchHistogram(  # observed once per batch (the joiner's hot path)
            "aitm_joiner_label_delay_seconds",
            "Event time from impression to final labels",
            _DELAY_BUCKETS,
            registry,
        )
        self.watermark_lag = Gauge(
            "aitm_joiner_watermark_lag_seconds",
            "How far the slowest topic watermark is behind the impressions beyond its allowed lateness (worst partition)",
            registry=registry,
        )
        self.store_size = Gauge(
            "aitm_joiner_store_size_bytes",
            "Bytes on disk of the joiner's local state",
            registry=registry,
        )


_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)
WINDOWS = ("sliding", "lifetime")


class TrainerMetrics:
    """The streaming trainer's metrics; quality is computed on final labels only."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.writer_lease = Gauge(
            "aitm_trainer_writer_lease",
            "1 while this trainer holds the model store's writer lease (active), 0 while it waits as a standby",
            registry=registry,
        )
        self.auc = Gauge(
            "aitm_trainer_auc_ratio",
            "Test-then-train conversion AUC per task on final labels",
            ["task", "window"],
            registry=registry,
        )
        self.frozen_auc = Gauge(
            "aitm_trainer_frozen_auc_ratio",
            "AUC per task of a copy of the model frozen after the first days, on the same batches",
            ["task", "window"],
            registry=registry,
        )
        self.paired_auc = Gauge(
            "aitm_trainer_since_freeze_auc_ratio",
            "AUC per task of the live model on the frozen copy's evaluation set (impressions after the freeze)",
            ["task", "window"],
            registry=registry,
        )
        self.log_loss = Gauge(
            "aitm_trainer_log_loss",
            "Test-then-train log loss per task on final labels",
            ["task", "window"],
            registry=registry,
        )
        self.calibration = Gauge(
            "aitm_trainer_calibration_ratio",
            "Mean predicted / observed positive rate per task",
            ["task", "window"],
            registry=registry,
        )
        self.positive_rate = Gauge(
            "aitm_trainer_positive_rate_ratio",
            "Observed positive rate per task on final labels",
            ["task", "window"],
            registry=registry,
        )
        self.served_log_loss = Gauge(
            "aitm_trainer_served_log_loss",
            "Log loss per task of the version being served, on held-back impressions whose label is settled",
            ["task"],
            registry=registry,
        )
        self.served_calibration = Gauge(
            "aitm_trainer_served_calibration_ratio",
            "Mean predicted / observed rate per task of the version being served, on held-back impressions "
            "whose label is settled",
            ["task"],
            registry=registry,
        )
        self.holdout_settled = Gauge(
            "aitm_trainer_holdout_impressions",
            "Held-back impressions (never trained on) old enough for the task's label to be settled: "
            "what the gate and the served-version gauges judge the task on",
            ["task"],
            registry=registry,
        )
        self.refused_versions = Counter(
            "aitm_trainer_refused_versions",
            "Candidate versions the publication gate refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.held_positives = Gauge(
            "aitm_trainer_held_positives",
            "Late positive rows waiting to be mixed with new impressions, per task",
            ["task"],
            registry=registry,
        )
        self.delay_factor = Gauge(
            "aitm_trainer_delay_factor",
            "Cold-start delay compensation per task: the served version's correction of the live model's mean rate (TRAINER_DELAY_CORRECTION=serve) or the weight of a positive arriving now (=train); 1 once the stream is older than the task's window",
            ["task"],
            registry=registry,
        )
        self.served_bias_shift = Gauge(
            "aitm_trainer_served_bias_shift",
            "Logit shift of the served average's output bias, per task, re-centring it on the live model's recent predictions",
            ["task"],
            registry=registry,
        )
        self.embedding_rows = Gauge(
            "aitm_trainer_embedding_rows",
            "Rows of the dynamic embedding table: the budget (TRAINER_EMBEDDING_ROWS) and those holding a value",
            ["state"],
            registry=registry,
        )
        self.embedding_admitted = Counter(
            "aitm_trainer_embedding_admitted",
            "Values given a row of the embedding table (rate() for admissions per second)",
            registry=registry,
        )
        self.embedding_evicted = Counter(
            "aitm_trainer_embedding_evicted",
            "Rows recycled from values not seen for TRAINER_EMBEDDING_TTL_MS (rate() for evictions per second)",
            registry=registry,
        )
        self.embedding_refused = Counter(
            "aitm_trainer_embedding_refused",
            "Values due a row that found the budget full and no row expired (they stay out of vocabulary)",
            registry=registry,
        )
        self.oov = Gauge(
            "aitm_trainer_oov_ratio",
            "Share of training look-ups out of vocabulary per feature field, since the last refresh",
            ["field"],
            registry=registry,
        )
        self.samples = Counter(
            "aitm_trainer_samples",
            "Samples consumed, by kind",
            ["kind"],
            registry=registry,
        )
        self.trained = Counter(
            "aitm_trainer_trained_samples",
            "Samples the model was updated on",
            registry=registry,
        )
        self.throughput = Gauge(
            "aitm_trainer_train_samples_per_second",
            "Training throughput over the last interval",
            registry=registry,
        )
        self.dead_letters = Counter(
            "aitm_trainer_dead_letters",
            "Sample records refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.model_version = Gauge(
            "aitm_trainer_model_version",
            "Latest model version published",
            registry=registry,
        )
        self.last_update = Gauge(
            "aitm_trainer_last_model_update_timestamp_seconds",
            "Unix time of the last published version",
            registry=registry,
        )
        self.checkpoints = Counter(
            "aitm_trainer_checkpoints",
            "Model versions published (announced)",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "aitm_trainer_consumer_lag_records",
            "Records behind the high watermark on samples",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "aitm_trainer_batch_seconds",
            "Wall time of one test-then-train batch",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=registry,
        )
        self.version_bytes = Gauge(
            "aitm_trainer_version_bytes",
            "Size of the last serving artifact written, by kind (full snapshot or delta; checkpoint: "
            "the training checkpoint)",
            ["kind"],
            registry=registry,
        )
        self.training_checkpoints = Counter(
            "aitm_trainer_training_checkpoints",
            "Training checkpoints written (TRAINER_TRAINING_CHECKPOINT_INTERVAL_MS, and at a clean stop)",
            registry=registry,
        )
        self.publish_stall = Histogram(
            "aitm_trainer_publish_stall_seconds",
            "Training-thread time a published version costs (snapshots; the writes are on writer threads)",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )


class ScorerMetrics:
    """The scorer's metrics (stream path and HTTP endpoint)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.scores = Counter(
            "aitm_scorer_scores",
            "Scores published to the scores topic",
            registry=registry,
        )
        self.latency = Histogram(
            "aitm_scorer_latency_seconds",
            "Scoring latency by path (stream batch per record, http request, http_batch request)",
            ["path"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.model_version = Gauge(
            "aitm_scorer_model_version",
            "Model version in use",
            registry=registry,
        )
        self.last_update = Gauge(
            "aitm_scorer_last_model_update_timestamp_seconds",
            "Unix time the version in use was published",
            registry=registry,
        )
        self.swaps = Counter(
            "aitm_scorer_model_swaps",
            "Model versions swapped in",
            registry=registry,
        )
        self.refused_models = Counter(
            "aitm_scorer_refused_models",
            "Announced versions refused (corrupt or unreadable)",
            registry=registry,
        )
        self.http_requests = Counter(
            "aitm_scorer_http_requests",
            "HTTP scoring requests by status code",
            ["code"],
            registry=registry,
        )
        self.http_impressions = Counter(
            "aitm_scorer_http_impressions",
            "Impressions scored over HTTP (POST /score and /score/batch)",
            registry=registry,
        )
        self.dead_letters = Counter(
            "aitm_scorer_dead_letters",
            "Impression records refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.commit_failures = Counter(
            "aitm_scorer_commit_failures",
            "Offset commits refused by a rebalance (records may be rescored)",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "aitm_scorer_consumer_lag_records",
            "Records behind the high watermark on impressions",
            registry=registry,
        )
        self.refresh_fallbacks = Counter(
            "aitm_scorer_refresh_fallbacks",
            "Model refreshes that fell back to a full snapshot, by reason (missing delta, broken chain, damaged file)",
            ["reason"],
            registry=registry,
        )
        self.delta_apply = Histogram(
            "aitm_scorer_delta_apply_seconds",
            "Wall time to apply one delta version in place",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
            registry=registry,
        )


class SimulatorMetrics:
    """The simulator's metrics: what it sent where, and how far simulated time has come."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.records = Counter(
            "aitm_simulator_records",
            "Records produced, by topic",
            ["topic"],
            registry=registry,
        )
        self.sim_time = Gauge(
            "aitm_simulator_time_seconds",
            "Simulated time reached (Unix seconds)",
            registry=registry,
        )


class BrokerMetrics:
    """The embedded broker wrapper's metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.up = Gauge("aitm_broker_up", "1 while the embedded broker process runs", registry=registry)
        self.topics = Gauge("aitm_broker_topics", "Topics created by the project", registry=registry)


class RefreshMetrics:
    """Model refresh metrics of the trainer or the scorer (``process``): seconds since the model
    version in use (or last published) was created, and sample-to-model freshness."""

    def __init__(self, registry: CollectorRegistry, process: str, age_seconds: Callable[[], float]) -> None:
        self.model_age = Gauge(
            f"aitm_{process}_model_age_seconds",
            "Seconds since the last model update (NaN before the first)",
            registry=registry,
        )
        self.model_age.set_function(age_seconds)
        self.freshness = Histogram(
            f"aitm_{process}_model_freshness_seconds",
            "Wall time from the trainer consuming the oldest sample new in a version to its publication "
            "(trainer) or swap-in (scorer)",
            buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 300),
            registry=registry,
        )
