"""Delayed feedback: which rows of a batch of samples to train on, with what labels, masks, weights.

Pure functions of the joiner's samples (``early`` policy: first / correction / final) and the
model's own predictions made *before* the batch is trained on (test-then-train). No torch here.

- ``final-only``: train on final samples only - correct labels, but late (up to T+14 days).
  The mask is the sample's ``mature`` flags, so an immature task never enters the loss.
- ``fnw`` (fake-negative weighting, Ktena et al. 2019): every first sample enters at once as a
  negative on every task (a fake negative where the label comes later), and each positive enters
  again as a positive - in the first sample for tasks already positive then, or in the
  correction that turns the task positive. The data then follow a biased distribution
  b(y=1|x) = p/(1+p); importance weights p/b restore the true one: (1 + p) for positives and
  (1 - p)(1 + p) for negatives, with p the model's own (stop-gradient) prediction of the task.
  Final samples are evaluated, and trained on only when their impression's first sample never
  came (then as plain labelled rows).

A correction carries ``seq`` = the step it reached (1..4) and credits that task: when one
correction jumps several steps (held out-of-order events) the intermediate tasks miss their
positive copy; that is rare and keeps the rule stateless.

>>> from stream.samples import Sample
>>> s = Sample("i", "b", 0, {}, (1, 0, 0, 0), (True, False, False, False), "first", 1800000, 0)
>>> rows = train_rows("fnw", [s], np.full((1, 4), 0.5))
>>> rows.index.tolist(), rows.labels.tolist()
([0, 0], [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

from stream.samples import Sample

Mode = Literal["final-only", "fnw"]
MODES: Final = ("final-only", "fnw")
N_TASKS: Final = 4


@dataclass(frozen=True)
class TrainRows:
    """Rows to train on: ``index`` (R,) into the batch, labels / mask / weight (R, T) float32."""

    index: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])


def _rows(index: list[int], labels: list[np.ndarray], mask: list[np.ndarray], weight: list[np.ndarray]) -> TrainRows:
    if not index:
        empty = np.zeros((0, N_TASKS), np.float32)
        return TrainRows(np.zeros(0, np.int64), empty, empty, empty)
    return TrainRows(
        np.asarray(index, np.int64),
        np.stack(labels).astype(np.float32),
        np.stack(mask).astype(np.float32),
        np.stack(weight).astype(np.float32),
    )


def train_rows(mode: str, samples: Sequence[Sample], probs: np.ndarray,
               first_seen: Sequence[bool] | None = None) -> TrainRows:
    """The rows of ``samples`` to train on under ``mode``; ``probs`` (N, T) are the pre-training
    predictions (used by ``fnw``'s importance weights). ``first_seen[i]``: was the first sample of
    final ``i``'s impression trained on? ``fnw`` trains a final whose first it never saw (the
    joiner skips the first sample when an impression is already final) as a labelled row."""
    if probs.shape != (len(samples), N_TASKS):
        raise ValueError(f"probs must be ({len(samples)}, {N_TASKS}), got {probs.shape}")
    index: list[int] = []
    labels: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    weight: list[np.ndarray] = []
    ones = np.ones(N_TASKS)
    if mode == "final-only":
        for i, s in enumerate(samples):
            if s.kind == "final":
                index.append(i)
                labels.append(np.asarray(s.labels, np.float64))
                mask.append(np.asarray(s.mature, np.float64))
                weight.append(ones)
        return _rows(index, labels, mask, weight)
    if mode != "fnw":
        raise ValueError(f"unknown delayed-feedback mode {mode!r}; one of {MODES}")
    p = np.clip(probs.astype(np.float64), 0.0, 1.0)
    w_pos = 1.0 + p  # (N, T)
    w_neg = (1.0 - p) * (1.0 + p)  # (N, T)
    for i, s in enumerate(samples):
        if s.kind == "first":
            index.append(i)  # the fake negative of every task
            labels.append(np.zeros(N_TASKS))
            mask.append(ones)
            weight.append(w_neg[i])
            y = np.asarray(s.labels, np.float64)
            if y.any():  # tasks already positive: their positive copy, now
                index.append(i)
                labels.append(y)
                mask.append(y)
                weight.append(w_pos[i])
        elif s.kind == "correction" and 1 <= s.seq <= N_TASKS and s.labels[s.seq - 1] == 1:
            onehot = np.zeros(N_TASKS)
            onehot[s.seq - 1] = 1.0
            index.append(i)
            labels.append(onehot)
            mask.append(onehot)
            weight.append(w_pos[i])
        elif s.kind == "final" and first_seen is not None and not first_seen[i]:
            index.append(i)
            labels.append(np.asarray(s.labels, np.float64))
            mask.append(np.asarray(s.mature, np.float64))
            weight.append(ones)
    return _rows(index, labels, mask, weight)
