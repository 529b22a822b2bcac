"""The served level of a task from a delay-corrected count of its positives (docs/serving.md,
seventh round).

The served version's output biases are shifted so that its mean prediction on recent impressions
equals a target. Until the seventh round the target was the live model's own mean prediction times
the completeness factor ``1 / mean G`` - right only if the live model has learned every positive
the delay model counts as arrived. It has not when positives wait (the mixing buffer paces a daily
file's burst of activations): the model learns them later than they arrive, and batch-fed
activation sat at 0.62-0.78 of the truth with the correction fully applied.

A count needs no model: of the newest impressions i (first samples, as trained), with event times
t_i, the positives of task ``t`` that have *arrived* so far number P, and with G the task's delay
distribution the expected count is ``r * sum_i G(now - t_i)``; the rate's maximum-likelihood
estimate is ``P / S``, S = sum_i G(now - t_i). A small count is noisy, so it is shrunk towards the
model's own served mean m by a pseudo-count c (a gamma prior of mean m worth c positives):
``(P + c) / (S + c / m)``. One bias shift per task changes no ranking (no AUC), only the level.

``ArrivedCounts`` keeps, for the newest ``capacity`` impressions, their event time and which tasks'
positives have arrived (an impression counts once per task, whatever copies carry it).

>>> c = ArrivedCounts(capacity=3, n_tasks=2)
>>> c.add_firsts(["a", "b"], np.array([0, 10]), np.array([[1, 0], [0, 0]]))
>>> c.credit(["b", "zz"], np.array([[1, 1], [1, 1]]))  # "zz" is not kept: ignored
>>> c.positives().tolist(), c.size
([2, 1], 2)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


class ArrivedCounts:
    """A ring of the newest ``capacity`` impressions: event time and, per task, whether a positive
    has arrived for it (first sample or any later copy)."""

    def __init__(self, capacity: int, n_tasks: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.at_ms = np.zeros(capacity, np.int64)
        self.hit = np.zeros((capacity, n_tasks), bool)
        self.ids: list[str | None] = [None] * capacity
        self.slot: dict[str, int] = {}
        self.size = 0
        self._next = 0

    def add_firsts(self, impression_ids: Sequence[str], event_ms: np.ndarray, labels: np.ndarray) -> None:
        """New impressions (their first samples): ids, event times (N,), labels so far (N, T)."""
        for iid, at, lab in zip(impression_ids, np.asarray(event_ms, np.int64).tolist(),
                                np.asarray(labels) > 0, strict=True):
            if iid in self.slot:  # a repeated first sample: only its labels count
                self.hit[self.slot[iid]] |= lab
                continue
            k = self._next
            old = self.ids[k]
            if old is not None:
                del self.slot[old]
            self.ids[k], self.at_ms[k], self.hit[k] = iid, at, lab
            self.slot[iid] = k
            self._next = (k + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def credit(self, impression_ids: Sequence[str], labels: np.ndarray) -> None:
        """Later copies (corrections): their labels (N, T) mark the kept impressions' positives."""
        pos = np.asarray(labels) > 0
        for iid, lab in zip(impression_ids, pos, strict=True):
            k = self.slot.get(iid)
            if k is not None and lab.any():
                self.hit[k] |= lab

    def positives(self) -> np.ndarray:
        """(T,) impressions kept with an arrived positive, per task."""
        out: np.ndarray = self.hit[: self.size].sum(0)
        return out

    def level(self, task: int, completeness: Callable[[np.ndarray], np.ndarray], model_mean: float,
              pseudo_count: float, min_mean_g: float = 0.0) -> tuple[float, float, float]:
        """(rate, P, S): task ``task``'s rate from the arrived count, shrunk towards ``model_mean``
        by ``pseudo_count`` positives; ``completeness`` maps the kept impressions' event times (K,) to
        G of their age now (K,). The mean G is kept at least ``min_mean_g`` (the delay model's cap)."""
        n = self.size
        p = float(self.hit[:n, task].sum())
        s = float(np.asarray(completeness(self.at_ms[:n]), np.float64).sum()) if n else 0.0
        s = max(s, min_mean_g * n)
        m = min(max(model_mean, 1e-9), 1.0)
        rate = (p + pseudo_count) / (s + pseudo_count / m) if s + pseudo_count > 0 else m
        return float(min(rate, 0.999)), p, s

    def state_dict(self) -> dict[str, Any]:
        n, k = self.size, self._next
        order = [(k - n + j) % self.capacity for j in range(n)]  # oldest first
        return {"ids": [self.ids[i] for i in order], "at_ms": self.at_ms[order].tolist(),
                "hit": self.hit[order].astype(np.int8).tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.__init__(self.capacity, self.hit.shape[1])  # type: ignore[misc]
        hit = np.asarray(state["hit"], np.int8).reshape(-1, self.hit.shape[1])
        self.add_firsts(list(state["ids"]), np.asarray(state["at_ms"], np.int64), hit)
