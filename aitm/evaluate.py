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


class SlidingWindowAUC:
    """Exact AUC over the last ``capacity`` labelled predictions (a ring buffer), plus a count.

    >>> w = SlidingWindowAUC(capacity=3)
    >>> w.update(np.array([1, 0, 0, 1]), np.array([0.0, 0.2, 0.3, 0.9]))
    >>> w.value(), w.total_count  # the first (1, 0.0) has left the window
    (1.0, 4)
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._labels = np.zeros(capacity, dtype=np.int8)
        self._scores = np.zeros(capacity, dtype=np.float64)
        self._next = 0  # slot the next prediction is written to
        self._size = 0  # filled slots
        self.total_count = 0  # lifetime number of labelled predictions

    def update(self, labels: np.ndarray, scores: np.ndarray) -> None:
        """Add a batch (N,) of labels and scores; the oldest fall out of the window."""
        y = np.asarray(labels).reshape(-1)
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if y.shape != s.shape:
            raise ValueError(f"labels {y.shape} and scores {s.shape} differ")
        self.total_count += y.size
        if y.size >= self.capacity:
            y, s = y[-self.capacity :], s[-self.capacity :]
        idx = (self._next + np.arange(y.size)) % self.capacity  # (n,)
        self._labels[idx] = y > 0
        self._scores[idx] = s
        self._next = int((self._next + y.size) % self.capacity)
        self._size = min(self.capacity, self._size + y.size)

    def __len__(self) -> int:
        return self._size

    def value(self) -> float:
        """AUC over the window; ``nan`` while it holds only one class."""
        return auc(self._labels[: self._size], self._scores[: self._size])
