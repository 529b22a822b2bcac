"""Metrics: exact AUC with ties against brute force, log loss, calibration, sliding window."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aitm.evaluate import auc, calibration_ratio, log_loss
from stream.learn.prequential import TaskWindow


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=2, max_size=60))
def test_auc_equals_pairwise_count_with_ties(pairs: list[tuple[int, int]]) -> None:
    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] for p in pairs], dtype=float)  # few distinct values: many ties
    if y.min() == y.max():
        assert math.isnan(auc(y, s))
    else:
        assert math.isclose(auc(y, s), _brute_auc(y, s), abs_tol=1e-12)


def test_auc_extremes() -> None:
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(y, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert auc(y, np.full(4, 0.7)) == 0.5  # a constant predictor


def test_log_loss_and_calibration() -> None:
    y = np.array([1, 0])
    assert math.isclose(log_loss(y, np.array([0.8, 0.4])), -(math.log(0.8) + math.log(0.6)) / 2)
    assert math.isclose(calibration_ratio(y, np.array([0.8, 0.4])), 1.2)
    assert math.isnan(calibration_ratio(np.zeros(3), np.ones(3)))


def test_sliding_window_equals_auc_of_last_n() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.2).astype(int)
    s = rng.random(1000) + 0.3 * y
    window = TaskWindow(300)
    for i in range(0, 1000, 70):  # uneven batches wrap around the ring
        window.update(y[i : i + 70], s[i : i + 70])
    assert window.window_values()["count"] == 300 and window.count == 1000
    assert math.isclose(window.window_values()["auc"], auc(y[-300:], s[-300:]))
    window.update(y[:500], s[:500])  # a batch larger than the window
    assert math.isclose(window.window_values()["auc"], auc(y[200:500], s[200:500]))


def test_sliding_window_nan_until_both_classes() -> None:
    window = TaskWindow(5)
    assert math.isnan(window.window_values()["auc"])
    window.update(np.array([0, 0]), np.array([0.1, 0.2]))
    assert math.isnan(window.window_values()["auc"])
