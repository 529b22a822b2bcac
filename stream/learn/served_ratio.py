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
approval to its activation, in the event time of what each sample reflects - which is one lognormal
with the step's configured window (``JOINER_WINDOW_ACTIVATION_MS`` counts from the approval): of the
kept approvals, A have activated so far, and each approval i of age a_i would have shown its
activation by now with probability G_c(a_i) if it has one, so ``E[A] = R x sum_i G_c(a_i)`` and
``R = A / sum_i G_c(a_i)``. Every approval counts its G, converted or not: the joiner sends the last
step's positive in the impression's final (the funnel is complete), and counting such an approval as
settled (1) where an unconverted one of the same age counts G < 1 read R at 0.57-0.70 of the truth
(the ninth round of docs/serving.md); only an approval settled *without* the step (its window has
passed) counts 1. G_c is a right-truncated lognormal fitted on the kept pairs (the delay, truncated
at the approval's age) with the window prior of the delay model (the window at its quantile): the
same fit as ``stream.learn.delay_model``, on one step instead of four. A small count is noisy, so R
is shrunk by a pseudo-count c, in approvals, ``(A + c x R_0) / (S + c)``, towards the live model's
own ratio - or, by default, the higher of it and the configured funnel's step rate
(``TRAINER_PRIOR_RATES``; ``TRAINER_SERVED_RATIO_TARGET``): a cold model's own ratio reads low, for
it learns late positives late (0.60-0.67 of the truth on days 5-7 of a batch-fed replay).

**The source's clock.** Times are the events the samples reflect (``event_time_ms + elapsed_ms``:
the approval's, the activation's), and ages are counted to the newest event of the step the source
has delivered, not to the newest sample: a partner that sends its activations in a daily file has
delivered nothing of the hours since its file's cut, and counting those hours as time to convert
would lower R a little more each hour until the next file (in a replay of a batch-fed run R swung
0.43-0.72 between versions half a day apart that way). On event time a file's delays are the
conversions' own, not rounded up to the next file. A predecessor after that newest delivery has age
0. A source that delivers as conversions happen has its newest event minutes ago.

**The young predecessors are left out** (``min_g``, ``TRAINER_SERVED_RATIO_MIN_G``, 0.65): those
whose fitted G is under it. Their G rests on the head of the fit, which a young stream's fit gets
least right, and where a small error is a large share of a small G: in a kept realtime run's
samples (days 4-11) the count read 0.81-0.92 of the same approvals' eventual rate with every
approval, 0.95-1.07 with G >= 0.65 (docs/serving.md, ninth round). What is lost is the newest
predecessors: the count follows a step rate that changes slowly.

**Untimed pairs** - an impression met only by its final (the joiner sent no first sample), a
partner's file holding both an approval and its activation - bring both positives at once. They are
kept out of the fit, and counted as the delay's share at zero: G_c(a) = p0 + (1 - p0) G(a), p0 the
untimed share of the step's positives the kept approvals will have had (``zero_delay_share``).

**A sample of the predecessors, not the newest ones** (``horizon_ms``, the step's window): the count
needs predecessors of every age up to the window, but a ring of the newest ``capacity`` covers
less of it the more traffic there is - 65,536 clicks are under three days of a million impressions a
day, where every one is too young to count (``min_g``) and R falls back to its shrinkage target.
So when a new predecessor would take the slot of one still inside the window, the ring halves its
sampling rate: it keeps the predecessors whose impression id hashes (crc32) to 0 modulo 2^bits,
``bits`` one higher, and drops the rest. A and sum G are both sums over the same sampled
predecessors, so their ratio estimates R as the full count does (with 2^bits times its noise);
a predecessor's later samples find it kept or not by the same hash. The rate only falls: a stream
whose traffic drops keeps a sparser sample than it could.

>>> c = StepCounts(capacity=8)
>>> c.observe(["a", "b", "c"], np.array([1, 1, 0]), np.array([0, 0, 0]), np.array([10, 10, 10]), np.zeros(3, bool))
>>> c.observe(["a"], np.array([1]), np.array([1]), np.array([30]), np.zeros(1, bool))
>>> c.size, c.pairs()
(2, (array([20.]), array([10.])))
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stream.learn.delay_model import fit_truncated_lognormal, windowed_lognormal_cdf
from stream.learn.keyed_ring import KeyedSlots


def zero_delay_share(untimed: int, g_timed: np.ndarray) -> float:
    """The share of the step's positives that arrive with their predecessor (delay 0), of all the
    positives the kept predecessors will have had: each timed one seen at G stands for 1 / G
    (Horvitz-Thompson; G floored at 0.05), an untimed one for itself - it is never late.

    >>> zero_delay_share(0, np.array([0.5])), zero_delay_share(2, np.array([0.5, 1.0]))
    (0.0, 0.4)
    """
    timed = float((1.0 / np.maximum(g_timed, 0.05)).sum())
    return untimed / (untimed + timed) if untimed else 0.0


class StepCounts(KeyedSlots):
    """The newest ``capacity`` impressions with a positive of a step's predecessor - of those
    sampled, with ``horizon_ms`` (module doc) - : when that positive happened (the event time its
    sample reflects), when the step's own did (-1: not yet), and whether the two came together
    (untimed: not fitted) or the impression is settled (its final came; without the step's
    positive it counts 1)."""

    MAX_BITS = 24  # a sample of 1 in 2^24 predecessors at the sparsest

    def __init__(self, capacity: int, horizon_ms: int | None = None) -> None:
        super().__init__(capacity)
        self.horizon_ms = horizon_ms  # the step's window: a predecessor younger than it is not dropped
        self.bits = 0  # predecessors kept: those whose id's crc32 is 0 modulo 2^bits
        self.newest_before_ms = -1
        self.before_ms = np.zeros(capacity, np.int64)
        self.hit_ms = np.full(capacity, -1, np.int64)
        self.together = np.zeros(capacity, bool)
        self.settled = np.zeros(capacity, bool)
        self.last_hit_ms = -1  # the newest event of the step's positive: how far its source has delivered

    def sampled(self, impression_id: str) -> bool:
        """Whether the impression is in the sample (all are until the ring first thins)."""
        return self.bits == 0 or zlib.crc32(impression_id.encode()) & ((1 << self.bits) - 1) == 0

    def _room(self, at_ms: int) -> None:
        """Before a new predecessor of event time ``at_ms`` takes the oldest slot: while that slot's
        predecessor is still inside the window of the newest, halve the sample (module doc)."""
        if self.horizon_ms is None:
            return
        newest = max(self.newest_before_ms, at_ms)
        while (self.size == self.capacity and self.bits < self.MAX_BITS
               and self.before_ms[self._next] > newest - self.horizon_ms):
            self.bits += 1
            kept = [k for k in self.order() if self.sampled(str(self.keys[k]))]
            for column in (self.before_ms, self.hit_ms, self.together, self.settled):
                column[: len(kept)] = column[kept]
            self.compact(kept)

    def observe(self, impression_ids: Sequence[str], before: np.ndarray, step: np.ndarray,
                at_ms: np.ndarray, settled: np.ndarray) -> None:
        """Samples (N,): whether each carries the predecessor's positive, the step's positive, the
        event time it reflects and whether it is a final. Labels are cumulative: a copy counts only
        what is new."""
        for j, iid in enumerate(impression_ids):
            k = self.slot.get(iid)
            at = int(at_ms[j])
            if k is None:
                if not before[j] or not self.sampled(iid):
                    continue
                self._room(at)
                if not self.sampled(iid):  # the sample just thinned
                    continue
                k = self.claim(iid)
                self.newest_before_ms = max(self.newest_before_ms, at)
                self.before_ms[k], self.hit_ms[k] = at, -1
                self.together[k] = bool(step[j])
                self.settled[k] = False
            if step[j] and self.hit_ms[k] < 0:
                self.hit_ms[k] = at
                self.last_hit_ms = max(self.last_hit_ms, at)
            self.settled[k] |= bool(settled[j])

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(delays, event times of the predecessor) of the timed pairs kept, ms: what the step's
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
        Ages are counted to the newest event of the step's positive, not to the newest sample: a
        source that delivers in files (a bank's daily activation file) has delivered nothing of
        the hours since its file's cut, and counting them would lower the rate until the next file
        (module doc)."""
        n = self.size
        if n == 0 or self.last_hit_ms < 0:
            return float(own), 0.0, 0.0
        now_ms = self.last_hit_ms
        delays, before = self.pairs()
        fit = fit_truncated_lognormal(np.clip(delays, 1.0, window_ms), np.minimum(now_ms - before, window_ms),
                                      (window_ms, quantile), z_sd)
        # a kept predecessor whose event is after the newest one the source delivered has age 0: G = 0
        g = windowed_lognormal_cdf(np.maximum(now_ms - self.before_ms[:n], 1), fit, window_ms)
        hit, together = self.hit_ms[:n] >= 0, self.together[:n]
        p0 = zero_delay_share(int(together.sum()), g[hit & ~together])
        g = p0 + (1.0 - p0) * g  # a converted predecessor counts its G too, settled or not (module doc)
        g = np.where(self.settled[:n] & ~hit, 1.0, g)  # settled unconverted: it cannot convert any more
        kept = g >= min_g
        a, s = float((hit & kept).sum()), float(g[kept].sum())
        r = (a + pseudo_count * own) / (s + pseudo_count) if s + pseudo_count > 0 else own
        return float(min(max(r, 0.0), 1.0)), a, s

    def state_dict(self) -> dict[str, Any]:
        order = self.order()
        return {"keys": [self.keys[i] for i in order], "before_ms": self.before_ms[order].tolist(),
                "hit_ms": self.hit_ms[order].tolist(), "together": self.together[order].tolist(),
                "settled": self.settled[order].tolist(),
                "last_hit_ms": self.last_hit_ms, "sample_bits": self.bits, "newest_before_ms": self.newest_before_ms}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.__init__(self.capacity, self.horizon_ms)  # type: ignore[misc]
        self.bits = int(state.get("sample_bits", 0))
        self.newest_before_ms = int(state.get("newest_before_ms", -1))
        keys = list(state["keys"])[-self.capacity:]
        m = len(keys)
        for key in keys:
            self.claim(key)
        for name in ("before_ms", "hit_ms", "together", "settled"):
            getattr(self, name)[:m] = np.asarray(state[name])[-m:] if m else []
        self.last_hit_ms = int(state.get("last_hit_ms", -1))
