"""The publication gate refuses a clearly worse candidate (counted, logged, nothing written or
announced), publishes otherwise, judges each task only on held-back impressions old enough for
its label to be settled, and the served-version gauges report the version in use on them -
checked against the published file scored the way the scorer scores it."""

from __future__ import annotations

import doctest
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

import stream.learn.publication_gate
from aitm.model import AITM, AITMConfig
from aitm.projection import funnel_order
from stream.contract.events import TASKS
from stream.contract.samples import Sample
from stream.learn.publication_gate import HoldoutSet, PublicationGate, judge
from stream.learn.sample_batch import SampleBatch
from stream.learn.stabilisers import held_back
from stream.learn.trainer import Trainer
from stream.ops.model_store import ModelStore
from stream.ops.settings import Settings
from stream.serve.scoring import ScoringModel

FIELDS = ("a", "b", "c")


def test_doctests() -> None:
    assert doctest.testmod(stream.learn.publication_gate).failed == 0


def model_with_rates(rates: tuple[float, ...], seed: int = 0) -> AITM:
    torch.manual_seed(seed)
    m = AITM(AITMConfig(vocab_sizes=(8, 8, 8)))
    with torch.no_grad():
        p = torch.tensor(rates)
        m.head_b.copy_(torch.log(p / (1 - p)))
        m.head_w.mul_(0.01)  # near-constant predictions: the rates above
    return m.eval()


DAY = 86_400_000


def window(n: int, rates: tuple[float, ...], seed: int = 1) -> HoldoutSet:
    """``n`` held-back impressions, all old enough for every label to be settled."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, 4), np.int8)
    u = rng.random(n)
    for t, r in enumerate(rates):
        y[:, t] = u < r  # nested: monotone labels
    w = HoldoutSet([DAY, 2 * DAY, 3 * DAY, 4 * DAY], per_task=20_000)
    w.add([f"h{seed}-{i}" for i in range(n)], rng.integers(1, 8, size=(n, 3)), y, np.zeros(n, np.int64), 5 * DAY)
    return w


TRUTH = (0.25, 0.03, 0.02, 0.015)


def test_a_blown_up_candidate_is_refused_and_a_good_one_published() -> None:
    gate = PublicationGate(window(4000, TRUTH), min_rows=500)
    gate.published(1, model_with_rates(TRUTH), None)
    assert gate.judge(model_with_rates(TRUTH, seed=1)).publish  # as good: published
    bad = gate.judge(model_with_rates((0.25, 0.12, 0.22, 0.38)))  # the tail blow-up of issue 19
    assert not bad.publish and bad.reason == "log_loss"
    assert bad.candidate is not None and bad.serving is not None
    assert bad.task in (1, 2, 3) and bad.candidate.log_loss[0] > 1.1 * bad.serving.log_loss[0]
    assert f"task {bad.task}" in bad.detail


def test_a_candidate_off_by_a_large_factor_is_refused_on_calibration() -> None:
    w = window(20_000, TRUTH)
    _, y = w.settled(3)
    y = np.tile(y.reshape(-1, 1), (1, 4))
    serving = funnel_order(np.tile(np.array(TRUTH), (len(y), 1)))
    low = serving.copy()
    low[:, 3] = TRUTH[3] / 3  # activation 3x too low
    v = judge(low, serving, y, log_loss_margin=10.0, calibration_margin=1.5)  # (log loss rule off)
    assert not v.publish and v.reason == "calibration" and v.task == 3
    gate = PublicationGate(w, min_rows=500, log_loss_margin=10.0)
    gate.published(1, model_with_rates(TRUTH), None)
    v = gate.judge(model_with_rates((0.25, 0.03, 0.02, 0.004)))  # the same through the gate
    assert not v.publish and v.reason == "calibration" and v.task == 3
    # the same error on a handful of positives cannot be told from noise: not blocked
    few = y[:600]
    assert few[:, 3].sum() < 15
    assert judge(low[:600], serving[:600], few, 10.0, 1.5).publish


def test_too_few_settled_impressions_or_nothing_served_means_no_judgement() -> None:
    gate = PublicationGate(window(100, TRUTH), min_rows=500)
    assert gate.judge(model_with_rates((0.9, 0.9, 0.9, 0.9))).publish  # nothing served yet
    gate.published(1, model_with_rates(TRUTH), None)
    v = gate.judge(model_with_rates((0.9, 0.9, 0.9, 0.9)))
    assert v.publish and "fewer than 500" in v.detail


def test_each_task_is_judged_only_on_impressions_old_enough_for_its_label() -> None:
    h = HoldoutSet([DAY, 2 * DAY, 3 * DAY, 4 * DAY], per_task=100)
    ids = np.ones((1, 3), np.int64)
    for age_days in range(6):  # one impression a day, days 0..5; the stream is now at day 5.5
        h.add([f"d{age_days}"], ids, np.array([[1, 0, 0, 0]]), np.array([age_days * DAY]), int(5.5 * DAY))
    assert h.counts() == [5, 4, 3, 2]  # e.g. approval (3 days): impressions of days 0, 1 and 2
    # a later sample of an impression only adds positives (labels are monotone)
    h.add(["d0"], ids, np.array([[1, 1, 1, 0]]), np.array([0]), int(5.5 * DAY))
    h.add(["d0"], ids, np.array([[1, 1, 0, 0]]), np.array([0]), int(5.5 * DAY))
    assert h.settled(2)[1].tolist() == [1, 0, 0]
    # an impression is judged by its age, never by its labels: a settled positive and a settled
    # negative of the same age are both in
    h.add(["n", "p"], np.ones((2, 3), np.int64), np.array([[0, 0, 0, 0], [1, 1, 1, 1]]),
          np.array([DAY, DAY]), int(5.5 * DAY))
    assert h.counts() == [7, 6, 5, 4]


def test_the_served_version_sees_later_ids_as_out_of_vocabulary() -> None:
    gate = PublicationGate(HoldoutSet([DAY] * 4), min_rows=1)
    model = model_with_rates(TRUTH)
    gate.published(1, model, [2, 2, 2])
    x = np.array([[1, 2, 7]])
    mapped = gate._probs(gate.serving.model, x, gate.serving.known)  # type: ignore[union-attr]
    with torch.no_grad():
        direct = torch.sigmoid(model(torch.tensor([[1, 2, 0]]))).numpy()
    np.testing.assert_allclose(mapped, funnel_order(direct), rtol=1e-6)


def test_the_set_keeps_the_newest_and_round_trips() -> None:
    h = HoldoutSet([DAY] * 4, per_task=3, capacity=5)
    h.add([f"i{k}" for k in range(7)], np.arange(21).reshape(7, 3), np.eye(4, dtype=np.int8)[[0, 1, 2, 3, 0, 1, 2]],
          np.arange(7) * 1000, 3 * DAY)
    h._evict()
    assert len(h) == 3  # only the newest 3 settled ones can still be judged on
    ids, _ = h.settled(0)
    assert ids[:, 0].tolist() == [12, 15, 18]  # the newest 3 settled ones, oldest first
    again = HoldoutSet([DAY] * 4, per_task=3, capacity=5)
    again.load_state_dict(h.state_dict())
    assert again.settled(0)[0][:, 0].tolist() == [12, 15, 18] and again.now_ms == h.now_ms
    for k in range(200):  # newer impressions, settled or not: the old ones give way
        h.add([f"n{k}"], np.ones((1, 3), np.int64), np.zeros((1, 4)), np.array([(30 - k * 0.001) * DAY]), 30 * DAY)
    h._evict()
    assert len(h) == 5 and "i6" not in h._rows  # the capacity


# --- in the trainer ----------------------------------------------------------------------------


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def send(self, topic: str, key: bytes = b"", value: bytes = b"") -> None:
        self.sent.append((topic, value))

    def flush(self) -> None:
        return


def samples(n: int, seed: int) -> list[Sample]:
    """Impressions with their final samples only (labels depend on feature ``a``), spread over 30
    days so that the held-back ones are old enough for every label to be settled by the end."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = int(rng.integers(0, 4))
        click = int(rng.random() < 0.2 + 0.1 * a)
        app = click * int(rng.random() < 0.3)
        labels = (click, app, app * int(rng.random() < 0.5), 0)
        feats = {"a": str(a), "b": str(int(rng.integers(0, 4))), "c": str(int(rng.integers(0, 4)))}
        t = 1_767_225_600_000 + i * 30 * DAY // n
        out.append(Sample(f"s{seed}-{i}", "bank_1", t, feats, labels, (True,) * 4, "final", 3_600_000, 5, t + DAY))
    return out


def trainer(tmp_path: Path, registry: CollectorRegistry, **overrides: Any) -> Trainer:
    # a training checkpoint with every version: these tests read versions by their checkpoints
    overrides.setdefault("trainer_training_checkpoint_interval_ms", 0)
    overrides.setdefault("model_store_keep_checkpoints", 1000)
    settings = Settings(data_dir=tmp_path, trainer_mode="final-only", trainer_holdout_share=0.3,
                        trainer_gate_min_rows=200, trainer_feature_min_count=1, trainer_embedding_rows=64,
                        trainer_min_step_rows=1, trainer_freeze_after_days=0, **overrides)
    t = Trainer(settings, registry)
    t._producer = FakeProducer()
    return t


def test_the_trainer_refuses_a_bad_candidate_and_counts_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    t = trainer(tmp_path, registry)
    t._step(SampleBatch.from_samples(samples(2000, 0)), 0, 0)
    assert min(t.gate.holdout.counts()) > 200  # the held-back slice, never trained on
    assert t.checkpoint() is not None  # nothing served yet: published
    t.publisher.wait_all()  # its training checkpoint is written after the announcement
    store = ModelStore(t.store.root)
    assert store.versions() == [1]
    # a candidate whose activation blew up, as after the last impression in issue 19
    learner = t.learner
    assert learner is not None
    with torch.no_grad():
        learner.served_model().head_b[3] = 2.0
    with caplog.at_level(logging.WARNING):
        assert t.checkpoint() is None
    t.publisher.wait_all()
    assert "not published (log_loss)" in caplog.text
    assert registry.get_sample_value("aitm_trainer_refused_versions_total", {"reason": "log_loss"}) == 1
    assert registry.get_sample_value("aitm_trainer_refused_versions_total", {"reason": "calibration"}) == 0
    assert store.versions() == [1]  # nothing written ...
    assert len([s for s in t._producer.sent if s[0] == t.s.topic_model_versions]) == 1  # ... or announced
    assert t.summary(1.0)["refused_versions"] == 1


def test_served_version_gauges_report_the_published_version_on_held_back_finals(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    t = trainer(tmp_path, registry)
    data = samples(3000, 1)
    t._step(SampleBatch.from_samples(data[:1500]), 0, 0)
    t._step(SampleBatch.from_samples(data[1500:]), 0, 0)
    v = t.checkpoint()
    assert v is not None
    t.publisher.wait_all()
    t.update_quality_gauges()
    # independently: the published file, scored by the scorer's own code, on the held-back finals
    m = ScoringModel.from_checkpoint(v.version, ModelStore(t.store.root).load(v.version))
    held = [s for s in data if held_back([s.impression_id], 0.3)[0]]
    now = max(s.watermark_ms for s in data)
    for k, task in enumerate(TASKS):
        settled = [s for s in held if s.event_time_ms <= now - t.gate.holdout.horizons_ms[k]]
        assert 0 < len(settled) < len(held)
        assert len(settled) == registry.get_sample_value("aitm_trainer_holdout_impressions", {"task": task})
        p = m.predict([s.features for s in settled])
        y = np.array([s.labels for s in settled], np.float64)
        got_ll = registry.get_sample_value("aitm_trainer_served_log_loss", {"task": task})
        got_cal = registry.get_sample_value("aitm_trainer_served_calibration_ratio", {"task": task})
        pk = np.clip(p[:, k], 1e-7, 1 - 1e-7)
        ll = float(-(y[:, k] * np.log(pk) + (1 - y[:, k]) * np.log1p(-pk)).mean())
        assert got_ll == pytest.approx(ll, rel=1e-4)
        if y[:, k].sum():
            assert got_cal == pytest.approx(float(p[:, k].sum() / y[:, k].sum()), rel=1e-4)
        else:
            assert got_cal is not None and math.isnan(got_cal)
    # the held-back impressions were never trained on; the others were
    assert t.learner is not None and t.learner.trained_samples == len(data) - len(held)
