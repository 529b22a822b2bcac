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
estimate is ``P / S``, S = sum_i G(now - t_i) - for impressions of one rate. Here they are not: most
impressions never click, are settled at once (their final comes with the click window) and can never
convert, and G's mean over them is near 1 - it would dilute the G of the impressions whose positives
are still to come. So G is averaged over the impressions that can still convert (those met by a first
sample, or clicked), and the rate over all n is ``P / (n x that mean G)``. (Two other forms read
0.5-0.7 of the truth mid-stream, docs/serving.md, seventh round: one G-weighted rate over every
impression, and a count stratified by settled / open - an activated funnel's final goes out at its
activation, so the settled impressions hold nearly every positive and the open ones none.) A small count is
noisy, so it is shrunk towards the model's own served mean m by a pseudo-count c, in positives: ``(P * count + c * m) / (P + c)`` - the
count's share grows with the positives it rests on. (Not the gamma prior's ``(P + c) / (S + c / m)``:
that one gives the model's mean the weight of c / m impressions, which is all of them when a
live model that has not learned its positives yet predicts next to nothing.) One bias shift per
task changes no ranking (no AUC), only the level.

**Which impressions.** The joiner sends a first sample only for an impression still open when it
is due (``JOINER_OBSERVE_MS`` after it): mostly the ones that clicked. The others reach the trainer
only as a final (settled: a non-clicker's final comes with its click window). A count over first
samples alone is a count over clickers - whose application rate is 4x the impressions' - so the
count keeps every impression the trainer meets, its first sample or, failing one, its final; and
the served shift for a counted task is solved on these impressions (their encoded features are
kept), not on the re-centring ring's (first samples only). An impression whose final has come is
settled: it counts in full (G = 1) with its final labels.

``ArrivedCounts`` keeps, for the newest ``capacity`` impressions, their encoded features, event time,
the live model's prediction when it met them, whether they are settled and which tasks' positives
have arrived (an impression counts once per task, whatever copies carry it).

>>> c = ArrivedCounts(capacity=3, n_tasks=2, n_fields=1)
>>> z = np.zeros((2, 1), np.int64)
>>> c.add(["a", "b"], z, np.array([0, 10]), np.array([[1, 0], [0, 0]]), np.zeros((2, 2)), settled=False)
>>> c.credit(["b", "zz"], np.array([[1, 1], [1, 1]]))  # "zz" is not kept: ignored
>>> c.positives().tolist(), c.size
([2, 1], 2)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from stream.learn.keyed_ring import KeyedSlots


class ArrivedCounts(KeyedSlots):
    """A ring of the newest ``capacity`` impressions the trainer met: encoded features, event time,
    the live prediction then, settled or not, and per task whether a positive has arrived for it."""

    def __init__(self, capacity: int, n_tasks: int, n_fields: int) -> None:
        super().__init__(capacity)
        self.ids = np.zeros((capacity, n_fields), np.int64)
        self.probs = np.zeros((capacity, n_tasks), np.float64)
        self.at_ms = np.zeros(capacity, np.int64)
        self.hit = np.zeros((capacity, n_tasks), bool)
        self.settled = np.zeros(capacity, bool)
        self.first = np.zeros(capacity, bool)  # met by a first sample (not only by its final)

    def add(self, impression_ids: Sequence[str], ids: np.ndarray, event_ms: np.ndarray, labels: np.ndarray,
            probs: np.ndarray, settled: bool) -> None:
        """Impressions met: their ids, encoded features (N, F), event times (N,), labels so far
        (N, T), the live predictions (N, T); ``settled``: these are finals (every label in). One
        already kept is credited instead."""
        lab = np.asarray(labels) > 0
        at = np.asarray(event_ms, np.int64)
        for j, iid in enumerate(impression_ids):
            if iid in self.slot:
                self.credit([iid], lab[j : j + 1], settled)
                continue
            k = self.claim(iid)
            self.ids[k], self.at_ms[k], self.hit[k], self.probs[k], self.settled[k] = ids[j], at[j], lab[j], probs[j], settled
            self.first[k] = not settled

    def credit(self, impression_ids: Sequence[str], labels: np.ndarray, settled: bool = False) -> None:
        """Later copies (corrections; finals with ``settled``): their labels (N, T) mark the kept
        impressions' positives."""
        pos = np.asarray(labels) > 0
        for iid, lab in zip(impression_ids, pos, strict=True):
            k = self.slot.get(iid)
            if k is not None:
                self.hit[k] |= lab
                self.settled[k] |= settled

    def positives(self) -> np.ndarray:
        """(T,) impressions kept with an arrived positive, per task."""
        out: np.ndarray = self.hit[: self.size].sum(0)
        return out

    def level(self, task: int, completeness: Callable[[np.ndarray], np.ndarray], model_mean: float,
              pseudo_count: float, min_mean_g: float = 0.0) -> tuple[float, float, float]:
        """(rate, P, S): task ``task``'s rate from the arrived count (stratified, module doc), shrunk towards
        ``model_mean`` by ``pseudo_count`` positives (module doc); ``completeness`` maps event times
        (K,) to G of their age now (K,), a settled impression counts 1. The mean G is kept at least
        ``min_mean_g`` (the delay model's cap)."""
        n = self.size
        if n == 0:
            return float(model_mean), 0.0, 0.0
        hit = self.hit[:n, task]
        p = float(hit.sum())
        if p == 0:
            return float(model_mean), p, 0.0
        # the impressions that can still convert: met by a first sample, or clicked
        pool = self.first[:n] | self.hit[:n, 0] if task > 0 else np.ones(n, bool)
        g = np.asarray(completeness(self.at_ms[:n][pool]), np.float64)
        mean_g = max(float(g.mean()) if g.size else 1.0, min_mean_g)
        s = n * mean_g
        rate = (p * (p / s) + pseudo_count * model_mean) / (p + pseudo_count)
        return float(min(rate, 0.999)), p, s

    def state_dict(self) -> dict[str, Any]:
        order = self.order()
        return {"keys": [self.keys[i] for i in order], "ids": self.ids[order].tolist(),
                "at_ms": self.at_ms[order].tolist(), "hit": self.hit[order].astype(np.int8).tolist(),
                "probs": self.probs[order].tolist(), "settled": self.settled[order].tolist(),
                "first": self.first[order].tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        n_tasks, n_fields = self.hit.shape[1], self.ids.shape[1]
        self.__init__(self.capacity, n_tasks, n_fields)  # type: ignore[misc]
        settled = np.asarray(state["settled"], bool)
        keys = list(state["keys"])
        ids = np.asarray(state["ids"], np.int64).reshape(-1, n_fields)
        hit = np.asarray(state["hit"], np.int8).reshape(-1, n_tasks)
        probs = np.asarray(state["probs"], np.float64).reshape(-1, n_tasks)
        at = np.asarray(state["at_ms"], np.int64)
        first = np.asarray(state.get("first", ~settled), bool)
        for j, key in enumerate(keys):
            self.add([key], ids[j : j + 1], at[j : j + 1], hit[j : j + 1], probs[j : j + 1], not first[j])
            self.settled[self.slot[key]] = settled[j]
