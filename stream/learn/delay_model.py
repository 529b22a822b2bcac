"""Cold-start delay compensation: a model of each task's conversion delay, and the weight it gives
the positives a young stream trains on.

``fnw`` trains every impression's negative at once and its positive when the conversion arrives.
In a steady stream that is unbiased: the positives arriving now, for older impressions, stand in
for those not arrived yet. A stream that *starts* at S0 has no older impressions: at stream age
A = now - S0 a task's positives arrive at G(A) of their steady rate, G being the task's delay
distribution (impression to the positive's arrival at the trainer) restricted to its window W
(``G(A) = F(A) / F(W)``: a positive later than W never arrives at all, in steady state either).
Activation (a lognormal delay after approval, median 2 days) spends its first two weeks in that
warm-up, learning rates far below the truth (docs/serving.md). Weighting the positives that arrive
at age A by ``1 / G(A)`` (capped; 1 once A >= W) restores their steady rate, as DFM / ES-DFM do per
impression, here globally per task: the distribution, not the impression, is modelled.

The delay of task ``t`` is a lognormal fitted by maximum likelihood to the positives seen so far.
They are *right-truncated*: an impression of age T_i can only have shown a delay d_i <= T_i, so
each contributes ``log f(d_i) - log F(T_i)`` (Lynden-Bell's setting; the parametric form is what
lets G be extrapolated past the ages seen so far). The positives are kept as a uniform reservoir
(never chosen by their delay). Everything is in event time (impression times, partition
watermarks), so a replay or a restart computes the same factors; the state is checkpointed.

**The window prior** (``prior_windows_ms``, the fourth round of docs/serving.md). A young stream's
positives only show the delay's head: the truncated likelihood is flat along "shorter and
narrower", and a fit on a cold start's first 30-60 activations put a two-day median at one day,
which made the correction too small for days. What fixes the tail is what the product already
knows: each step has a configured window (``JOINER_WINDOW_<STEP>_MS``), counted from its
predecessor, and a window is set to hold nearly every conversion. The fit is a MAP estimate with a
weak prior saying that the step's window (plus the predecessor's fitted median delay, the time the
step's clock starts) is the ``quantile`` (0.95) quantile of the delay: ``(ln W - mu) / sigma ~
N(z_q, 0.75)``, with ``ln sigma ~ N(0, 0.5)`` as before. It is a prior, not a rule: its weight is
that of about one observation, so a delay the positives do show (every step whose delays are short
beside its stream's age) is the data's; it decides only what they cannot show yet. With it a task
has a delay estimate from its first positive (the prior alone before), and the served correction
comes in as positives arrive, ``n / (n + prior_ramp)`` (``TRAINER_DELAY_SERVED_RAMP``: 20 in the
fourth round, 5 since the sixth), not after a first fit on 30.

>>> m = DelayModel(windows_ms=(10, 100), max_factor=5.0)
>>> m.start(0)
>>> m.factor(1, 100), m.factor(1, 1000)  # no fit yet, and past the window
(1.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import torch

MIN_POSITIVES: Final = 30  # positives a task needs before its delay is fitted (before: factor 1)
RESERVOIR: Final = 4000  # positives kept per task for the fit
REFIT_GROWTH: Final = 1.1  # refit a task when its positives grew by 10% ...
REFIT_AGE: Final = 0.02  # ... or the stream aged by 2% of the task's window since its last fit
# the served correction comes in gradually: 1 / G to the power n / (n + SERVED_RAMP), n the positives
# seen past MIN_POSITIVES (a first fit on 30 positives is too rough to apply in full at once)
SERVED_RAMP: Final = 60
# with the window prior: the served correction is applied to the power n / (n + PRIOR_RAMP), n the
# positives seen. A cold model starts at its prior rates (TRAINER_PRIOR_RATES) and its predictions
# are learned from positives only as they come; PRIOR_RAMP positives make it half its own (in logs).
# The default of ``prior_ramp``; the trainer's comes from TRAINER_DELAY_SERVED_RAMP (docs/serving.md)
PRIOR_RAMP: Final = 20
PRIOR_Z_SD: Final = 0.75  # sd of the window's z-score under the prior (95% -> 80-99.9% at 2 sd)
PRIOR_LOG_SIGMA_SD: Final = 0.5  # sd of ln sigma around 0 (sigma = 1)


def lognormal_cdf(x: np.ndarray | float, mu: float, sigma: float) -> np.ndarray:
    """F(x) of a lognormal(mu, sigma); 0 for x <= 0.

    >>> [round(float(v), 4) for v in lognormal_cdf(np.array([0.0, 1.0, math.e]), 0.0, 1.0)]
    [0.0, 0.5, 0.8413]
    """
    x = np.asarray(x, np.float64)
    z = (np.log(np.maximum(x, 1e-300)) - mu) / (sigma * math.sqrt(2.0))
    out: np.ndarray = np.where(x > 0, 0.5 * (1.0 + _erf(z)), 0.0)
    return out


def windowed_lognormal_cdf(age_ms: np.ndarray, fit: tuple[float, float], window_ms: float) -> np.ndarray:
    """G(age) = F(age) / F(W) of a lognormal ``fit`` (mu, sigma) restricted to the window W: 1 at or
    past it.

    >>> [round(float(v), 3) for v in windowed_lognormal_cdf(np.array([1.0, 5.0]), (0.0, 1.0), 5.0)]
    [0.528, 1.0]
    """
    age = np.asarray(age_ms, np.float64)
    top = float(lognormal_cdf(float(window_ms), *fit))
    inside = lognormal_cdf(np.minimum(age, window_ms), *fit) / max(top, 1e-12)
    out: np.ndarray = np.where(age < window_ms, inside, 1.0)
    return out


def _erf(z: np.ndarray) -> np.ndarray:
    return torch.special.erf(torch.as_tensor(z, dtype=torch.float64)).numpy()


def window_z(quantile: float) -> float:
    """The standard normal's ``quantile`` quantile: where a window holding that share of the delays
    sits, in sigmas above the log-median.

    >>> round(window_z(0.95), 3)
    1.645
    """
    return float(torch.special.ndtri(torch.tensor(quantile, dtype=torch.float64)))


def fit_truncated_lognormal(delays: np.ndarray, truncation: np.ndarray,
                            window_prior: tuple[float, float] | None = None,
                            z_sd: float = PRIOR_Z_SD) -> tuple[float, float]:
    """(mu, sigma) maximising sum(log f(d_i) - log F(T_i)) over a lognormal, d_i <= T_i (all > 0),
    plus a log prior.

    ``window_prior`` = (W ms, q): the window prior of the module doc - ``(ln W - mu) / sigma`` is
    normal around the q-quantile's z-score (sd ``z_sd``, by default ``PRIOR_Z_SD``) and ``ln sigma`` around 0 (sd
    ``PRIOR_LOG_SIGMA_SD``); with no delays at all the prior's mode, ``(ln W - z_q, 1)``.
    Without it (the third round's prior): sigma near 1 and mu within ~1.5 e-folds of the mean log
    delay seen - which a truncated sample's mean pulls short (docs/serving.md, fourth round).

    >>> mu, sigma = fit_truncated_lognormal(np.zeros(0), np.zeros(0), (math.e**5, 0.5))
    >>> round(mu, 6), round(sigma, 6)
    (5.0, 1.0)
    """
    d = torch.as_tensor(np.log(np.maximum(delays, 1.0)), dtype=torch.float64)  # log ms
    t = torch.as_tensor(np.log(np.maximum(truncation, delays) + 1.0), dtype=torch.float64)
    if window_prior is not None:
        log_w, z_q = math.log(max(window_prior[0], 1.0)), window_z(window_prior[1])
        if d.numel() == 0:
            return log_w - z_q, 1.0
        centre = log_w - z_q
    else:
        centre = float(d.mean())
    mu = torch.tensor(float(d.mean()), dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor(max(math.log(float(d.std()) + 1e-3), -2.0) if d.numel() > 1 else 0.0,
                             dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([mu, log_sigma], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")
    n = float(d.numel())

    def nll() -> torch.Tensor:
        opt.zero_grad()
        sigma = log_sigma.exp()
        z = (d - mu) / sigma
        ll = (-log_sigma - 0.5 * z * z).sum() - torch.special.log_ndtr((t - mu) / sigma).sum()
        if window_prior is not None:
            prior = (-0.5 * (log_sigma / PRIOR_LOG_SIGMA_SD) ** 2
                     - 0.5 * (((log_w - mu) / sigma - z_q) / z_sd) ** 2)
        else:
            prior = -0.5 * (log_sigma / 0.5) ** 2 - 0.5 * ((mu - centre) / 1.5) ** 2
        loss = -(ll + prior) / n
        loss.backward()
        return loss

    opt.step(nll)
    m, s = float(mu.detach()), float(log_sigma.detach().exp())
    if not (math.isfinite(m) and math.isfinite(s)):
        return centre, 1.0
    return m, min(max(s, 0.05), 10.0)


class DelayModel:
    """Per task: a delay fit from the positives seen, and the factor for positives arriving at an
    age. ``windows_ms[t]``: the longest delay task ``t``'s positive can arrive with;
    ``prior_windows_ms[t]``: the step's own window (from its predecessor), the window prior's W, at
    the ``quantile`` (None: the third round's fit, from 30 positives)."""

    def __init__(self, windows_ms: Sequence[int], max_factor: float = 3.0,
                 prior_windows_ms: Sequence[int] | None = None, quantile: float = 0.95,
                 prior_ramp: float = PRIOR_RAMP, prior_z_sd: float = PRIOR_Z_SD) -> None:
        if max_factor < 1:
            raise ValueError(f"max_factor must be >= 1, got {max_factor}")
        if prior_windows_ms is not None and (len(prior_windows_ms) != len(windows_ms) or not 0.5 < quantile < 1):
            raise ValueError(f"one prior window per task and a quantile in (0.5, 1), got {prior_windows_ms}, {quantile}")
        self.windows_ms = [int(w) for w in windows_ms]
        self.max_factor = float(max_factor)
        # the window prior (module doc): each step's own window, counted from its predecessor
        self.prior_windows_ms = None if prior_windows_ms is None else [int(w) for w in prior_windows_ms]
        self.quantile = float(quantile)
        if prior_ramp < 0:
            raise ValueError(f"prior_ramp must be >= 0, got {prior_ramp}")
        self.prior_ramp = float(prior_ramp)  # with the window prior: n / (n + prior_ramp); 0 = in full
        if prior_z_sd <= 0:
            raise ValueError(f"prior_z_sd must be > 0, got {prior_z_sd}")
        self.prior_z_sd = float(prior_z_sd)  # the window prior's sd of the window's z-score
        self.min_positives = 1 if self.prior_windows_ms is not None else MIN_POSITIVES
        n = len(self.windows_ms)
        self.start_ms: int | None = None  # event time of the stream's first sample
        self.now_ms = 0  # event-time progress: the newest arrival seen
        self.seen = [0] * n  # positives seen per task, lifetime
        self.delays: list[np.ndarray] = [np.zeros(0, np.int64) for _ in range(n)]  # reservoir: arrival delay
        self.imp_ms: list[np.ndarray] = [np.zeros(0, np.int64) for _ in range(n)]  # ... and impression time
        self.fits: list[tuple[float, float] | None] = [None] * n  # (mu, sigma) of log-ms delays
        self._fit_at: list[tuple[int, int]] = [(0, 0)] * n  # (seen, now_ms) at the last fit
        self._rng = np.random.default_rng(0)

    def start(self, start_ms: int) -> None:
        """The stream's start (set once; a checkpoint keeps it)."""
        if self.start_ms is None:
            self.start_ms = int(start_ms)

    def age_ms(self, at_ms: np.ndarray | int) -> np.ndarray:
        return np.asarray(at_ms, np.int64) - (self.start_ms if self.start_ms is not None else 0)

    def warm(self, task: int) -> bool:
        """Is the stream older than the task's window (no correction any more)?"""
        return self.start_ms is not None and self.now_ms - self.start_ms >= self.windows_ms[task]

    def observe(self, task: int, imp_ms: np.ndarray, arrival_ms: np.ndarray) -> None:
        """Positives of ``task``: impression event times and arrival times (event time), (P,)."""
        imp_ms = np.asarray(imp_ms, np.int64)
        arrival_ms = np.asarray(arrival_ms, np.int64)
        if imp_ms.size == 0:
            return
        self.now_ms = max(self.now_ms, int(arrival_ms.max()))
        if self.warm(task):
            return
        delay = np.clip(arrival_ms - imp_ms, 1, self.windows_ms[task])
        room = max(RESERVOIR - self.delays[task].size, 0)  # reservoir sampling (Vitter's R), vectorised
        if room:
            self.delays[task] = np.concatenate([self.delays[task], delay[:room]])
            self.imp_ms[task] = np.concatenate([self.imp_ms[task], imp_ms[:room]])
        rest = delay.size - min(room, delay.size)
        if rest:
            rank = self.seen[task] + room + 1 + np.arange(rest)  # each later positive's rank
            j = (self._rng.random(rest) * rank).astype(np.int64)
            keep = j < RESERVOIR  # it replaces a kept one with probability RESERVOIR / rank
            self.delays[task][j[keep]] = delay[room:][keep]
            self.imp_ms[task][j[keep]] = imp_ms[room:][keep]
        self.seen[task] += int(delay.size)
        self._maybe_refit(task)

    def advance(self, now_ms: int) -> None:
        """Event time moved on (a batch with no positives of some task)."""
        self.now_ms = max(self.now_ms, int(now_ms))

    def _maybe_refit(self, task: int) -> None:
        n = self.delays[task].size
        if n < self.min_positives:
            return
        seen_then, now_then = self._fit_at[task]
        if (self.fits[task] is not None and self.seen[task] < REFIT_GROWTH * seen_then
                and self.now_ms - now_then < REFIT_AGE * self.windows_ms[task]):
            return
        self.refit(task)

    def refit(self, task: int) -> None:
        """Fit task ``task``'s delay now: each kept positive truncated at its impression's age."""
        if self.delays[task].size < self.min_positives:
            return
        age = np.minimum(self.now_ms - self.imp_ms[task], self.windows_ms[task])
        self.fits[task] = fit_truncated_lognormal(self.delays[task].astype(np.float64), age.astype(np.float64),
                                                  self.window_prior(task), self.prior_z_sd)
        self._fit_at[task] = (self.seen[task], self.now_ms)

    def window_prior(self, task: int) -> tuple[float, float] | None:
        """(W, quantile) of the task's window prior: its step's window plus its predecessor's fitted
        median delay (the step's clock starts at the predecessor's event); None without the prior."""
        if self.prior_windows_ms is None:
            return None
        before = self.fits[task - 1] if task > 0 else None
        return self.prior_windows_ms[task] + (math.exp(before[0]) if before is not None else 0.0), self.quantile

    def cdf(self, task: int, delay_ms: np.ndarray | float) -> np.ndarray:
        """G(delay) = F(delay) / F(W): the fitted delay distribution within the task's window."""
        fit = self.fits[task]
        x = np.asarray(delay_ms, np.float64)
        if fit is None:
            return np.ones_like(x)
        return windowed_lognormal_cdf(x, fit, self.windows_ms[task])

    def windowed_cdf(self, task: int, age_ms: np.ndarray) -> np.ndarray:
        """G at these ages (ms, > 0): the fitted distribution within the window, 1 at or past it."""
        age = np.asarray(age_ms, np.float64)
        out: np.ndarray = np.where(age < self.windows_ms[task], self.cdf(task, age), 1.0)
        return out

    def factors(self, task: int, arrival_ms: np.ndarray) -> np.ndarray:
        """(P,) weight of positives of ``task`` arriving at these event times: 1 / G(age), capped at
        ``max_factor``; 1 at or past the window, before a fit, or before the stream started."""
        arrival_ms = np.asarray(arrival_ms, np.int64)
        out = np.ones(arrival_ms.shape, np.float64)
        if self.start_ms is None or self.fits[task] is None:
            return out
        age = self.age_ms(arrival_ms)
        young = age < self.windows_ms[task]
        if young.any():
            g = self.cdf(task, np.maximum(age[young], 1).astype(np.float64))
            out[young] = np.minimum(1.0 / np.maximum(g, 1.0 / self.max_factor), self.max_factor)
        return out

    def completeness_factor(self, task: int, at_ms: np.ndarray, weights: np.ndarray) -> float:
        """1 / (the ``weights``-weighted mean of G(age) at the event times ``at_ms``), capped: how far
        the positives behind predictions made at those times fall short of their steady rate. The
        served correction: a model that learned while the stream was young predicts about
        p * G(age) where the truth is p (see the module's docstring). It comes in as the fit firms
        up: to the power n / (n + SERVED_RAMP), n the positives seen past the first fit's 30; with
        the window prior n / (n + prior_ramp), n the positives seen."""
        if self.start_ms is None or self.fits[task] is None or weights.size == 0 or self.warm(task):
            return 1.0
        g = self.windowed_cdf(task, np.maximum(self.age_ms(at_ms), 1))
        mean_g = float((weights * np.maximum(g, 1.0 / self.max_factor)).sum() / max(float(weights.sum()), 1e-300))
        return float(min(1.0 / max(mean_g, 1e-12), self.max_factor) ** self.ramp(task))

    def completeness(self, task: int) -> float:
        """G(the stream's age now): the share of task ``task``'s steady rate of positives arriving
        now (at least ``1 / max_factor``; 1 before a fit, before the stream started and past the
        window). The mixing buffer paces late positives by it (docs/serving.md, sixth round)."""
        if self.start_ms is None or self.fits[task] is None or self.warm(task):
            return 1.0
        g = float(self.cdf(task, float(max(self.now_ms - self.start_ms, 1)))[()])
        return min(max(g, 1.0 / self.max_factor), 1.0)

    def ramp(self, task: int) -> float:
        """The share (in logs) of the completeness factor the served version gets now."""
        if self.prior_windows_ms is not None:
            return 1.0 if self.prior_ramp == 0 else self.seen[task] / (self.seen[task] + self.prior_ramp)
        n = max(self.seen[task] - MIN_POSITIVES, 0)
        return n / (n + SERVED_RAMP)

    def factor(self, task: int, at_ms: int | None = None) -> float:
        """The factor now (or at ``at_ms``): the gauge ``aitm_trainer_delay_factor``."""
        at = self.now_ms if at_ms is None else at_ms
        return float(self.factors(task, np.asarray([at]))[0])

    def state_dict(self) -> dict[str, Any]:
        return {
            "start_ms": self.start_ms, "now_ms": self.now_ms, "seen": list(self.seen),
            "delays": [d.tolist() for d in self.delays], "imp_ms": [i.tolist() for i in self.imp_ms],
            "fits": [list(f) if f is not None else None for f in self.fits],
            "fit_at": [list(f) for f in self._fit_at], "windows_ms": list(self.windows_ms),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.start_ms = None if state["start_ms"] is None else int(state["start_ms"])
        self.now_ms = int(state["now_ms"])
        self.seen = [int(v) for v in state["seen"]]
        self.delays = [np.asarray(d, np.int64) for d in state["delays"]]
        self.imp_ms = [np.asarray(i, np.int64) for i in state["imp_ms"]]
        self.fits = [None if f is None else (float(f[0]), float(f[1])) for f in state["fits"]]
        self._fit_at = [(int(a), int(b)) for a, b in state["fit_at"]]
