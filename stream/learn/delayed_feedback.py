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

>>> from stream.contract.samples import Sample
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

from stream.contract.samples import Sample
from stream.learn.sample_batch import CORRECTION, FINAL, FIRST, N_TASKS, SampleBatch, as_batch

Mode = Literal["final-only", "fnw"]
MODES: Final = ("final-only", "fnw")


@dataclass(frozen=True)
class TrainRows:
    """Rows to train on: ``index`` (R,) into the batch, labels / mask / weight (R, T) float32."""

    index: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])


def _rows(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> TrainRows:
    """Concatenate (index, labels, mask, weight) blocks, then order rows by batch index (stable,
    so a first sample's fake negative stays before its positive copy)."""
    index = np.concatenate([p[0] for p in parts]).astype(np.int64)
    order = np.argsort(index, kind="stable")
    return TrainRows(
        index[order],
        np.concatenate([p[1] for p in parts]).astype(np.float32)[order].reshape(-1, N_TASKS),
        np.concatenate([p[2] for p in parts]).astype(np.float32)[order].reshape(-1, N_TASKS),
        np.concatenate([p[3] for p in parts]).astype(np.float32)[order].reshape(-1, N_TASKS),
    )


def train_rows(mode: str, samples: SampleBatch | Sequence[Sample], probs: np.ndarray,
               first_seen: Sequence[bool] | np.ndarray | None = None) -> TrainRows:
    """The rows of ``samples`` to train on under ``mode``; ``probs`` (N, T) are the pre-training
    predictions (used by ``fnw``'s importance weights). ``first_seen[i]``: was the first sample of
    final ``i``'s impression trained on? ``fnw`` trains a final whose first it never saw (the
    joiner skips the first sample when an impression is already final) as a labelled row.
    Vectorised: no Python work per sample."""
    batch = as_batch(samples)
    n = len(batch)
    if probs.shape != (n, N_TASKS):
        raise ValueError(f"probs must be ({n}, {N_TASKS}), got {probs.shape}")
    if mode not in MODES:
        raise ValueError(f"unknown delayed-feedback mode {mode!r}; one of {MODES}")
    kind, seq = batch.kind, batch.seq
    y = batch.labels.astype(np.float32)  # (N, T)
    mature = batch.mature.astype(np.float32)  # (N, T)
    ones = np.ones((1, N_TASKS), np.float32)
    final = np.flatnonzero(kind == FINAL)
    if mode == "final-only":
        return _rows([(final, y[final], mature[final], np.broadcast_to(ones, (final.size, N_TASKS)))])
    p = np.clip(probs.astype(np.float64), 0.0, 1.0)
    w_pos = 1.0 + p  # (N, T)
    w_neg = (1.0 - p) * (1.0 + p)  # (N, T)
    first = np.flatnonzero(kind == FIRST)
    zeros = np.zeros((first.size, N_TASKS), np.float32)
    parts = [(first, zeros, np.broadcast_to(ones, zeros.shape), w_neg[first])]  # every task's fake negative
    pos = first[y[first].any(axis=1)]  # tasks already positive at the first sample: their positive copy
    parts.append((pos, y[pos], y[pos], w_pos[pos]))
    step = np.clip(seq, 1, N_TASKS) - 1  # (N,) the task a correction credits
    credited = (kind == CORRECTION) & (seq >= 1) & (seq <= N_TASKS) & (y[np.arange(n), step] == 1)
    corr = np.flatnonzero(credited)
    onehot = np.zeros((corr.size, N_TASKS), np.float32)
    onehot[np.arange(corr.size), step[corr]] = 1.0
    parts.append((corr, onehot, onehot, w_pos[corr]))
    if first_seen is not None:
        unseen = final[~np.asarray(first_seen, bool)[final]]
        parts.append((unseen, y[unseen], mature[unseen], np.broadcast_to(ones, (unseen.size, N_TASKS))))
    return _rows(parts)
