"""The calibrator's weight (``TRAINER_CALIBRATOR_ALPHA``): why the served activation sat low, and the setting.

AITM's Behavioral Expectation Calibrator, ``alpha * mean(max(p_t - p_(t-1), 0))``, is one-sided: it
only ever lowers a step and raises the step before it. Where two steps' true rates are close
(activation ~0.8 x approval in the simulated card funnel) a model with any noise in its predictions
puts the later step above the earlier one on some rows even at the true rates, so the penalty is
active at the truth and the fitted mean of the later step ends below its label rate
(docs/serving.md, fifth round).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from aitm.features import FeatureEncoder
from stream.contract.samples import Sample
from stream.learn.learner import OnlineLearner
from stream.ops.settings import Settings, load_settings

FIELDS = ("a", "b", "c", "d")
ALL = (True, True, True, True)


def close_funnel(n: int, seed: int) -> list[Sample]:
    """Labelled finals of a funnel whose last step is 0.9 x the one before: click 50%, application
    ~40% of clicks (~20%), approval 40% of applications (~8%), activation 90% of approvals (~7%).
    Two features carry a little signal, much less than the model's noise at this learning rate."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = rng.integers(0, 20, len(FIELDS))
        lift = 1.0 + 0.3 * (f[0] % 2) - 0.15 * (f[1] % 3 == 0)
        c = rng.random() < 0.5
        a = c and rng.random() < 0.4 * lift
        p = a and rng.random() < 0.4
        v = p and rng.random() < 0.9
        labels = (int(c), int(a), int(p), int(v))
        out.append(Sample(f"s{seed}-{i}", "bank_1", 0, {k: str(x) for k, x in zip(FIELDS, f, strict=True)},
                          labels, ALL, "final", 1000, 5))  # type: ignore[arg-type]
    return out


def activation_over_label_rate(alpha: float) -> float:
    """Mean predicted activation / activation label rate, over the second half of a stream of
    labelled rows, each predicted before it is trained on (test-then-train)."""
    torch.manual_seed(0)
    ln = OnlineLearner(FeatureEncoder(FIELDS, capacity=32, min_count=1), mode="final-only", lr=0.02,
                       eval_window=100, alpha=alpha)
    preds, labels = [], []
    for b in range(120):
        batch = close_funnel(256, b)
        res = ln.step(batch)
        if b >= 60:
            preds.append(res.eval_probs[:, 3])
            labels.append([s.labels[3] for s in batch])
    return float(np.concatenate(preds).mean() / np.concatenate(labels).mean())


def test_the_paper_calibrator_pulls_a_close_later_step_below_its_label_rate() -> None:
    without = activation_over_label_rate(0.0)
    paper = activation_over_label_rate(0.6)
    assert without == pytest.approx(1.0, abs=0.08)  # plain BCE: the mean follows the labels
    assert paper < without - 0.04  # the one-sided penalty is active at the truth


def test_the_calibrator_weight_is_a_setting_the_trainer_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stream.learn.sample_batch import SampleBatch
    from stream.learn.trainer import Trainer
    from tests.unit.test_publication_gate import FakeProducer

    assert Settings().trainer_calibrator_alpha == 0.0  # the served order rests on the projection instead
    monkeypatch.setenv("TRAINER_CALIBRATOR_ALPHA", "0.25")
    assert load_settings().trainer_calibrator_alpha == 0.25
    t = Trainer(Settings(data_dir=tmp_path, trainer_feature_min_count=1, trainer_embedding_rows=64,
                         trainer_min_step_rows=1, trainer_freeze_after_days=0, trainer_calibrator_alpha=0.25),
                CollectorRegistry())
    t._producer = FakeProducer()
    t._step(SampleBatch.from_samples(close_funnel(64, 0)), 0, 0)
    assert t.learner is not None and t.learner.alpha == 0.25
    with pytest.raises(ValueError):
        Settings(trainer_calibrator_alpha=-0.1)
