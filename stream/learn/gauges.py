"""The trainer's quality gauges: the learner's test-then-train figures per task and window, the
frozen baseline's and the paired live ones, the served version's (from the publication gate),
and the stabilisers' state (positives held, delay factor, bias shift)."""

from __future__ import annotations

import numpy as np

from aitm.embedding_table import DynamicTable, Encoder
from stream.contract.events import TASKS
from stream.learn.learner import OnlineLearner
from stream.learn.publication_gate import PublicationGate
from stream.learn.sample_batch import N_TASKS
from stream.ops.metrics import WINDOWS, TrainerMetrics


def set_quality_gauges(metrics: TrainerMetrics, learner: OnlineLearner, gate: PublicationGate) -> None:
    values = learner.metric_values()
    for window in WINDOWS:
        for t, task in enumerate(TASKS[:N_TASKS]):
            vals = values[window][t]
            metrics.auc.labels(task=task, window=window).set(vals["auc"])
            metrics.log_loss.labels(task=task, window=window).set(vals["log_loss"])
            metrics.calibration.labels(task=task, window=window).set(vals["calibration"])
            metrics.positive_rate.labels(task=task, window=window).set(vals["positive_rate"])
    frozen = learner.frozen_metric_values()
    if frozen is not None:
        for window in WINDOWS:
            for t, task in enumerate(TASKS[:N_TASKS]):
                metrics.frozen_auc.labels(task=task, window=window).set(frozen[window][t]["auc"])
    served = gate.serving_figures()
    if served is not None:
        for t, task in enumerate(TASKS[:N_TASKS]):
            metrics.served_log_loss.labels(task=task).set(served.log_loss[t])
            metrics.served_calibration.labels(task=task).set(served.calibration[t])
    for t, n in enumerate(gate.holdout.counts()):
        metrics.holdout_settled.labels(task=TASKS[t]).set(n)
    held = learner.mixer.held
    for t, task in enumerate(TASKS[:N_TASKS]):
        metrics.held_positives.labels(task=task).set(sum(len(b) for b in held[t]))
        delay = learner.delay
        factor = 1.0 if delay is None else (delay.factor(t) if learner.stabilisers.delay_in_training
                                            else float(learner.completeness[t]))
        metrics.delay_factor.labels(task=task).set(factor)
        metrics.served_bias_shift.labels(task=task).set(float(learner.bias_shift[t]))
    paired = learner.paired_metric_values()
    if paired is not None:
        for window in WINDOWS:
            for t, task in enumerate(TASKS[:N_TASKS]):
                metrics.paired_auc.labels(task=task, window=window).set(paired[window][t]["auc"])


class TableGauges:
    """The embedding table's metrics: rows used, admissions/evictions (counters: ``rate()`` gives
    per second), and the OOV share per field since the previous refresh."""

    def __init__(self, metrics: TrainerMetrics) -> None:
        self.metrics = metrics
        self.seen: tuple[int, int, int] = (0, 0, 0)  # admissions, evictions, refused already counted
        self.lookups: np.ndarray | None = None
        self.misses: np.ndarray | None = None

    def refresh(self, encoder: Encoder) -> None:
        if not isinstance(encoder, DynamicTable):
            return
        m = self.metrics
        m.embedding_rows.labels(state="budget").set(encoder.rows)
        m.embedding_rows.labels(state="used").set(encoder.rows_used)
        now = (encoder.admissions, encoder.evictions, encoder.refused)
        if now[0] < self.seen[0]:  # a new learner (restored): count from its state on
            self.seen = now
        for counter, new, old in zip((m.embedding_admitted, m.embedding_evicted, m.embedding_refused), now,
                                     self.seen, strict=True):
            counter.inc(max(0, new - old))
        self.seen = now
        if self.lookups is not None and self.misses is not None and self.lookups.shape == encoder.lookups.shape:
            looked = encoder.lookups - self.lookups
            missed = encoder.misses - self.misses
            for f, name in enumerate(encoder.fields):
                if looked[f] > 0:
                    m.oov.labels(field=name).set(float(missed[f]) / float(looked[f]))
        self.lookups, self.misses = encoder.lookups.copy(), encoder.misses.copy()
