"""A task served at its predecessor's served level times a counted step rate (docs/serving.md,
eighth round).

The served level of a rare, late step (activation: median two days after approval, up to 14)
was set from the live model's own mean times a completeness factor 1 / G, G the delay of the
whole funnel (impression to activation) fitted on the positives so far. Mid-stream that left
activation at 0.6-0.75 of the truth in both delivery profiles: the live model learns late
positives later than they arrive (the mixing buffer paces a file's burst), and the fit of a
multi-step delay on a young stream's positives is short. Its predecessor does not have that
problem (approval: p05 0.84-0.91 in every replay and live run).

Activation's mean is approval's mean times the step rate ``R = P(activation | approval)`` weighted
by approval: ``mean(p_act) = mean(p_appr) x R`` over any impressions, whatever each one's own
conditional rate. ``R`` is counted on the approvals themselves, on the step's own clock - from each
approval's arrival to its activation's - which is one lognormal with the step's configured window
(``JOINER_WINDOW_ACTIVATION_MS`` counts from the approval): of the kept approvals, A have
activated so far, and each approval i of age a_i contributes G_c(a_i) expected activations per
unit rate, so ``R = A / sum_i G_c(a_i)`` (a settled impression, whose final came, counts 1). G_c
is a right-truncated lognormal fitted on the kept pairs (delay from the approval's arrival to the
activation's, truncated at the approval's age) with the window prior of the delay model (the
window at its quantile): the same fit as ``stream.learn.delay_model``, on one step instead of four.
A small count is noisy, so R is shrunk towards the model's own ratio by a pseudo-count c, in
approvals: ``(A + c x R_own) / (S + c)``.

**The source's clock.** Ages are counted to the newest arrival of the step's positive, not to the
newest sample: a partner that sends its activations in a daily file has delivered nothing of the
hours since its last file, and counting those hours as time to convert would lower R a little
more each hour until the next file (in a replay of a batch-fed run R swung 0.43-0.72 between
versions half a day apart that way). A predecessor that arrived after that newest delivery has age
0. A source that delivers as conversions happen has its newest arrival minutes ago.

**The young predecessors are left out** (``min_g``, ``TRAINER_SERVED_RATIO_MIN_G``, 0.65): those
whose fitted G is under it. Their G rests on the head of the fit, which a lognormal gets least right
(the real delay has a floor: a conversion takes some hours, a file waits for its day) and where a
small error is a large share of a small G. In a kept run's samples (days 4-13) the count read the
step rate at 0.70-0.91 (realtime) and 0.75-1.09 (batch-fed) of what the same predecessors' eventual
conversions gave; with those under G 0.5 left out at 0.80-0.94 and 0.88-1.41, under 0.65 at
0.88-1.04 and 0.98-1.41, under 0.8 at 1.00-1.38 and 1.01-1.41 (the lognormal's tail, too heavy for
the real delay, under-states G of the old ones: docs/serving.md, eighth round). The early
over-reading (days 3-5, a few dozen positives) is what the pseudo-count holds. What is lost is the newest predecessors: the count
follows a step rate that changes slowly.

Pairs the trainer cannot time are kept out of the fit but not out of the count: an impression met
only by its final (the joiner sent no first sample) brings its approval and activation at once,
already settled; a multi-step correction brings both at once too.

>>> c = StepCounts(capacity=8)
>>> c.observe(["a", "b", "c"], np.array([1, 1, 0]), np.array([0, 0, 0]), np.array([10, 10, 10]), np.zeros(3, bool))
>>> c.observe(["a"], np.array([1]), np.array([1]), np.array([30]), np.zeros(1, bool))
>>> c.size, c.pairs()
(2, (array([20.]), array([10.])))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stream.learn.delay_model import fit_truncated_lognormal, windowed_lognormal_cdf
from stream.learn.keyed_ring import KeyedSlots


class StepCounts(KeyedSlots):
    """The newest ``capacity`` impressions with a positive of a step's predecessor: when that
    positive arrived (event time), when the step's own arrived (-1: not yet), and whether the two
    came together (untimed: not fitted) or the impression is settled (its final came: counts 1)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.before_ms = np.zeros(capacity, np.int64)
        self.hit_ms = np.full(capacity, -1, np.int64)
        self.together = np.zeros(capacity, bool)
        self.settled = np.zeros(capacity, bool)
        self.last_hit_ms = -1  # the newest arrival of the step's positive: how far its source has delivered

    def observe(self, impression_ids: Sequence[str], before: np.ndarray, step: np.ndarray,
                arrival_ms: np.ndarray, settled: np.ndarray) -> None:
        """Samples (N,): whether each carries the predecessor's positive, the step's positive, when
        it arrived (event time) and whether it is a final. Labels are cumulative: a copy counts
        only what is new."""
        for j, iid in enumerate(impression_ids):
            k = self.slot.get(iid)
            at = int(arrival_ms[j])
            if k is None:
                if not before[j]:
                    continue
                k = self.claim(iid)
                self.before_ms[k], self.hit_ms[k] = at, -1
                self.together[k] = bool(step[j])
                self.settled[k] = False
            if step[j] and self.hit_ms[k] < 0:
                self.hit_ms[k] = at
                self.last_hit_ms = max(self.last_hit_ms, at)
            self.settled[k] |= bool(settled[j])

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(delays, arrival times of the predecessor) of the timed pairs kept, ms: what the step's
        delay is fitted on (each truncated at its predecessor's age)."""
        n = self.size
        timed = (self.hit_ms[:n] >= 0) & ~self.together[:n]
        return ((self.hit_ms[:n][timed] - self.before_ms[:n][timed]).astype(np.float64),
                self.before_ms[:n][timed].astype(np.float64))

    def ratio(self, window_ms: int, quantile: float, z_sd: float, own: float,
              pseudo_count: float, min_g: float = 0.0) -> tuple[float, float, float]:
        """(R, A, S): the step rate counted on the kept predecessors (module doc), shrunk towards
        ``own`` by ``pseudo_count`` predecessors; ``own`` alone before the step's first positive.
        Predecessors whose G is under ``min_g`` are left out (module doc).
        Ages are counted to the newest arrival of the step's positive, not to the newest sample: a
        source that delivers in files (a bank's daily activation file) has delivered nothing of
        the hours since its last file, and counting them would lower the rate until the next file
        (module doc)."""
        n = self.size
        if n == 0 or self.last_hit_ms < 0:
            return float(own), 0.0, 0.0
        now_ms = self.last_hit_ms
        delays, before = self.pairs()
        fit = fit_truncated_lognormal(np.clip(delays, 1.0, window_ms), np.minimum(now_ms - before, window_ms),
                                      (window_ms, quantile), z_sd)
        # a kept predecessor that arrived after the source's last delivery has age 0: G = 0
        g = windowed_lognormal_cdf(np.maximum(now_ms - self.before_ms[:n], 1), fit, window_ms)
        done = self.settled[:n] | self.together[:n]  # settled, or converted with no time to learn
        g = np.where(done, 1.0, g)
        kept = g >= min_g
        a, s = float(((self.hit_ms[:n] >= 0) & kept).sum()), float(g[kept].sum())
        r = (a + pseudo_count * own) / (s + pseudo_count) if s + pseudo_count > 0 else own
        return float(min(max(r, 0.0), 1.0)), a, s

    def state_dict(self) -> dict[str, Any]:
        order = self.order()
        return {"keys": [self.keys[i] for i in order], "before_ms": self.before_ms[order].tolist(),
                "hit_ms": self.hit_ms[order].tolist(), "together": self.together[order].tolist(),
                "settled": self.settled[order].tolist(),
                "last_hit_ms": self.last_hit_ms}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.__init__(self.capacity)  # type: ignore[misc]
        keys = list(state["keys"])[-self.capacity:]
        m = len(keys)
        for key in keys:
            self.claim(key)
        for name in ("before_ms", "hit_ms", "together", "settled"):
            getattr(self, name)[:m] = np.asarray(state[name])[-m:] if m else []
        self.last_hit_ms = int(state.get("last_hit_ms", -1))
