"""Prequential (test-then-train) evaluation per task: an exact sliding window and lifetime values.

The window keeps the last ``window`` (label, prediction) pairs of each task in a ring buffer and
computes AUC, log loss, calibration (mean predicted / observed rate) and the positive rate
exactly with ``aitm.evaluate``'s pure functions. Lifetime values are running sums; the lifetime
AUC comes from 4096 log-odds bins per class (ties within a bin count one half), so memory stays
bounded however long the trainer runs.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import torch

from aitm.evaluate import auc, calibration_ratio, log_loss

_BINS: Final = 4096
_LOGIT_SPAN: Final = 16.0  # bins cover log-odds in [-16, 16]
_EPS: Final = 1e-7
METRICS: Final = ("auc", "log_loss", "calibration", "positive_rate", "count")


def _bin(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, _EPS, 1 - _EPS)
    logit = np.log(p) - np.log1p(-p)
    pos = (logit + _LOGIT_SPAN) / (2 * _LOGIT_SPAN) * _BINS
    return np.clip(pos.astype(np.int64), 0, _BINS - 1)


def binned_auc(pos_counts: np.ndarray, neg_counts: np.ndarray) -> float:
    """AUC from per-bin positive and negative counts (ascending score); ties count one half."""
    n_pos, n_neg = float(pos_counts.sum()), float(neg_counts.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = np.cumsum(neg_counts) - neg_counts  # negatives in strictly lower bins
    wins = float((pos_counts * (neg_below + 0.5 * neg_counts)).sum())
    return wins / (n_pos * n_neg)


class TaskWindow:
    """One task's exact sliding window plus lifetime sums."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._labels = np.zeros(window, np.int8)
        self._probs = np.zeros(window, np.float64)
        self._next = 0
        self._size = 0
        self.count = 0
        self._positives = 0.0
        self._pred_sum = 0.0
        self._loss_sum = 0.0
        self._pos_bins = np.zeros(_BINS, np.int64)
        self._neg_bins = np.zeros(_BINS, np.int64)

    def update(self, labels: np.ndarray, probs: np.ndarray) -> None:
        y = (np.asarray(labels).reshape(-1) > 0).astype(np.int8)
        p = np.asarray(probs, np.float64).reshape(-1)
        if y.shape != p.shape:
            raise ValueError(f"labels {y.shape} and probs {p.shape} differ")
        if y.size == 0:
            return
        self.count += y.size
        self._positives += float(y.sum())
        self._pred_sum += float(p.sum())
        self._loss_sum += log_loss(y, p) * y.size
        bins = _bin(p)
        self._pos_bins += np.bincount(bins[y == 1], minlength=_BINS)
        self._neg_bins += np.bincount(bins[y == 0], minlength=_BINS)
        if y.size >= self.window:
            y, p = y[-self.window :], p[-self.window :]
        idx = (self._next + np.arange(y.size)) % self.window
        self._labels[idx] = y
        self._probs[idx] = p
        self._next = int((self._next + y.size) % self.window)
        self._size = min(self.window, self._size + y.size)

    def window_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The (labels, probs) now in the window (ring order, which no metric depends on)."""
        return self._labels[: self._size].copy(), self._probs[: self._size].copy()

    def window_values(self) -> dict[str, float]:
        y, p = self.window_pairs()
        if y.size == 0:
            return dict.fromkeys(METRICS, math.nan) | {"count": 0.0}
        return {
            "auc": auc(y, p),
            "log_loss": log_loss(y, p),
            "calibration": calibration_ratio(y, p),
            "positive_rate": float(y.mean()),
            "count": float(y.size),
        }

    def lifetime_values(self) -> dict[str, float]:
        if self.count == 0:
            return dict.fromkeys(METRICS, math.nan) | {"count": 0.0}
        return {
            "auc": binned_auc(self._pos_bins, self._neg_bins),
            "log_loss": self._loss_sum / self.count,
            "calibration": self._pred_sum / self._positives if self._positives else math.nan,
            "positive_rate": self._positives / self.count,
            "count": float(self.count),
        }

    def state_dict(self) -> dict[str, object]:
        return {
            "labels": torch.from_numpy(self._labels.copy()),
            "probs": torch.from_numpy(self._probs.copy()),
            "next": self._next,
            "size": self._size,
            "count": self.count,
            "sums": [self._positives, self._pred_sum, self._loss_sum],
            "pos_bins": self._pos_bins.tolist(),
            "neg_bins": self._neg_bins.tolist(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        labels = np.asarray(state["labels"], np.int8).reshape(-1)
        probs = np.asarray(state["probs"], np.float64).reshape(-1)
        n = min(labels.size, self.window)
        self._labels[:n], self._probs[:n] = labels[:n], probs[:n]
        self._size = min(int(state["size"]), self.window)  # type: ignore[call-overload]
        self._next = int(state["next"]) % self.window  # type: ignore[call-overload]
        self.count = int(state["count"])  # type: ignore[call-overload]
        sums = list(state["sums"])  # type: ignore[call-overload]
        self._positives, self._pred_sum, self._loss_sum = (float(x) for x in sums)
        self._pos_bins = np.asarray(state["pos_bins"], np.int64)
        self._neg_bins = np.asarray(state["neg_bins"], np.int64)


class PrequentialEvaluator:
    """Per-task windows fed with final labels and the predictions made before training."""

    def __init__(self, n_tasks: int, window: int) -> None:
        self.tasks = [TaskWindow(window) for _ in range(n_tasks)]

    def update(self, labels: np.ndarray, probs: np.ndarray) -> None:
        """Add (N, T) final labels and (N, T) predictions."""
        if labels.shape != probs.shape or labels.shape[1:] != (len(self.tasks),):
            raise ValueError(f"expected (N, {len(self.tasks)}) labels and probs, got {labels.shape}, {probs.shape}")
        for t, task in enumerate(self.tasks):
            task.update(labels[:, t], probs[:, t])

    def values(self) -> dict[str, list[dict[str, float]]]:
        """``{"sliding": [per task {metric: value}], "lifetime": [...]}``."""
        return {
            "sliding": [t.window_values() for t in self.tasks],
            "lifetime": [t.lifetime_values() for t in self.tasks],
        }

    def state_dict(self) -> list[dict[str, object]]:
        return [t.state_dict() for t in self.tasks]

    def load_state_dict(self, state: list[dict[str, object]]) -> None:
        for t, s in zip(self.tasks, state, strict=True):
            t.load_state_dict(s)
