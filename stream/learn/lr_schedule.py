"""The learning rate that follows the stream's volume (``TRAINER_LR_SCALE=volume``).

With a fixed batch, a stream of R impressions a day takes about R/B optimizer steps a day: the
drift each step must track is ~1/R while each step's gradient noise stays the same, and the rate
that tracks a drifting optimum best with SGD-like steps goes as sqrt(drift / noise) ~ R^(-1/2); a
rate that keeps the distance moved per day of event time goes as R^(-1). So

    lr = TRAINER_LR x (TRAINER_LR_REF_IMPRESSIONS / R) ^ TRAINER_LR_VOLUME_POWER,
         clipped to [LR_MIN_FACTOR, LR_MAX_FACTOR] x TRAINER_LR

with the power 0.75 by measurement (``bench online`` at 1,500, 4,000 and 20,000 impressions a day:
at 0.5 AITM's live model stayed below its frozen copy on activation at 20,000 a day; at 1 ESMM's
``auc_final`` fell at 20,000 a day and AITM's varied two to four times as much between seeds at 1,500)

with R the impressions a day - each counted once, by the first sample of any kind the trainer
meets for it (its first sample, or its final when the joiner sent it none: the joiner's emission
policy decides which impressions get a first; ``OnlineLearner._new_impressions``) - measured
in EVENT time (an exponential average over a day of the samples' own times, never the wall
clock: a replay gets the same rates; one day, since traffic has a daily cycle), and ``TRAINER_LR`` itself during the
first day of event time (a rate measured over part of a day is that part's rate: the night's is a
fifth of the evening's). The state is small and checkpointed with the learner; with several trainer ranks
every rank feeds it the round's counts summed over all ranks (``RankSync.volume``), so every
rank computes the same rate every round (docs/models.md, "The learning rate across volumes"):
a rank sees every sample of its partitions' impressions, so the sum over ranks is the stream's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

DAY_MS: Final = 86_400_000
HOUR_MS: Final = 3_600_000
LR_MIN_FACTOR: Final = 0.25  # the rate never leaves [0.25, 4] x TRAINER_LR
LR_MAX_FACTOR: Final = 4.0


@dataclass(frozen=True)
class VolumeScale:
    """The reference volume (impressions a day at which the base rate is the right one:
    ``TRAINER_LR_REF_IMPRESSIONS``), the averaging time constant and the warm-up, in days / hours
    of event time."""

    ref_per_day: float = 4_000.0
    power: float = 0.75  # lr ~ (ref / volume) ** power (TRAINER_LR_VOLUME_POWER; see the module's docstring)
    tau_days: float = 1.0
    warmup_hours: float = 24.0


class VolumeRate:
    """Impressions a day in event time, and the learning rate that follows from them.

    >>> v = VolumeRate(3e-3, VolumeScale(ref_per_day=2_400, power=0.5))
    >>> for hour in range(1, 49):  # 9,600 impressions a day: 4x the reference -> half the rate
    ...     _ = v.observe(400, hour * HOUR_MS, (hour - 1) * HOUR_MS)
    >>> round(v.per_day), round(v.lr, 6)
    (9600, 0.0015)
    """

    def __init__(self, base_lr: float, scale: VolumeScale) -> None:
        self.base_lr = base_lr
        self.scale = scale
        self.start_ms: int | None = None  # event time of the first observation
        self.last_ms: int | None = None  # latest event time seen (the clock only moves forward)
        self.count = 0.0  # impressions, exponentially decayed in event time
        self.span_ms = 0.0  # the decayed time those were counted over (-> tau at steady state)
        self.lr = base_lr

    @property
    def per_day(self) -> float:
        """The measured impressions a day (NaN before any time has passed)."""
        return self.count / self.span_ms * DAY_MS if self.span_ms > 0 else math.nan

    def observe(self, impressions: float, max_event_ms: int, min_event_ms: int | None = None) -> float:
        """Count a round's new ``impressions`` (over every rank) up to event time ``max_event_ms``
        (the round's latest; the first round's clock starts at its earliest, ``min_event_ms``);
        the learning rate for this round's step."""
        if self.start_ms is None or self.last_ms is None:
            self.start_ms = self.last_ms = int(max_event_ms if min_event_ms is None else min(min_event_ms, max_event_ms))
        dt = max(0, int(max_event_ms) - self.last_ms)
        self.last_ms += dt
        tau = self.scale.tau_days * DAY_MS
        decay = math.exp(-dt / tau)
        # the samples arrived evenly over the dt just passed: their decayed weight is the mean of
        # the decay over it (exact for a steady stream, whatever the round's length)
        spread = (1.0 - decay) * tau / dt if dt else 1.0
        self.count = self.count * decay + float(impressions) * spread
        self.span_ms = self.span_ms * decay + tau * (1.0 - decay)
        self.lr = self._rate()
        return self.lr

    def _rate(self) -> float:
        assert self.start_ms is not None and self.last_ms is not None
        if self.last_ms - self.start_ms < self.scale.warmup_hours * HOUR_MS or not self.count:
            return self.base_lr
        factor = (self.scale.ref_per_day / self.per_day) ** self.scale.power
        return self.base_lr * min(max(factor, LR_MIN_FACTOR), LR_MAX_FACTOR)

    def state_dict(self) -> dict[str, Any]:
        return {"start_ms": self.start_ms, "last_ms": self.last_ms, "count": self.count,
                "span_ms": self.span_ms, "lr": self.lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.start_ms = None if state["start_ms"] is None else int(state["start_ms"])
        self.last_ms = None if state["last_ms"] is None else int(state["last_ms"])
        self.count = float(state["count"])
        self.span_ms = float(state["span_ms"])
        self.lr = float(state["lr"])
