"""Offline metrics as pure functions (exact AUC, log loss, calibration) and a sliding-window AUC."""

from __future__ import annotations

import math

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC via the rank-sum statistic, ties counted as half; ``nan`` with one class.

    >>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.5, 0.5, 0.9]))
    0.875
    """
    y = np.asarray(labels).reshape(-1) > 0
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # average 1-based rank of each run of tied scores
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # (G,)
    ends = np.r_[starts[1:], s.size]  # (G,)
    avg_rank = (starts + ends + 1) / 2.0  # (G,)
    ranks = np.repeat(avg_rank, ends - starts)  # (N,) in sorted order
    rank_sum = float(ranks[y[order]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps])."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


def calibration_ratio(labels: np.ndarray, probs: np.ndarray) -> float:
    """Sum of predictions over sum of labels: 1 is calibrated on average, >1 over-predicts."""
    positives = float(np.asarray(labels, dtype=np.float64).sum())
    predicted = float(np.asarray(probs, dtype=np.float64).sum())
    return predicted / positives if positives > 0 else math.nan
