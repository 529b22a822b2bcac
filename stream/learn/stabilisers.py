"""What keeps the served scores steady (docs/serving.md): the knobs (``Stabilisers``), the
held-back slice never trained on, and output biases that start at the funnel's prior rates."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from aitm.model import AITM
from stream.contract.events import TASKS
from stream.learn.lr_schedule import VolumeScale
from stream.learn.publication_gate import settled_after_ms
from stream.ops.settings import Settings


@dataclass(frozen=True)
class Stabilisers:
    """What keeps the served scores steady (docs/serving.md); the defaults change nothing.

    ``min_step_rows``: rows an optimizer step needs (small batches are gathered); ``positive_slack``:
    late positives are released at most at this multiple of their usual rate per first sample
    (None: at once), that rate counted at the delay model's completeness (``positive_pace_steady``)
    or as seen; ``ema_half_life_rows``: serve an average of the weights (0: the trained ones);
    ``holdout_share``: impressions never trained on, whose finals judge the served versions;
    ``prior_rates``: end-to-end rates a cold-started model starts from (None: its biases start at 0,
    which is 50% on every step); ``recentre_rows``: re-centre the served average's output biases on
    the live model's predictions over this many recent impressions (0: off); ``delay_windows_ms``:
    per task, the longest delay of a positive - turns the cold-start delay compensation on
    (``stream.learn.delay_model``; None: off), its factor capped at ``delay_max_factor``, applied
    to the served biases (``delay_in_training`` False) or to the trained positives' weights;
    ``delay_prior_windows_ms``: each step's own window, the delay fit's prior (the window is the
    ``delay_window_quantile`` quantile of the delay; None: no window prior); ``lr_volume``: the
    learning rate follows the stream's volume (``stream.learn.lr_schedule``; None: fixed)."""

    min_step_rows: int = 1
    positive_slack: float | None = None
    positive_half_life: float = 20_000.0
    positive_pace_steady: bool = False  # late positives' usual rate: the steady one (measured / G), not as seen
    ema_half_life_rows: float = 0.0
    holdout_share: float = 0.0
    prior_rates: tuple[float, ...] | None = None  # a new model's output biases start at their log-odds
    recentre_rows: int = 0
    delay_windows_ms: tuple[int, ...] | None = None
    delay_max_factor: float = 3.0
    delay_in_training: bool = False
    delay_prior_windows_ms: tuple[int, ...] | None = None  # each step's own window: the delay fit's prior
    delay_window_quantile: float = 0.95
    delay_window_prior_sd: float = 0.75  # the window prior's sd of the window's z-score
    delay_served_ramp: float = 20.0  # the served correction's ramp, n / (n + this) with the window prior
    lr_volume: VolumeScale | None = None
    # the served level from a delay-corrected count of arrived positives (stream.learn.served_level):
    # the tasks it sets, its pseudo-count and the impressions counted
    served_level_tasks: tuple[int, ...] = ()  # none: off
    served_level_pseudo_count: float = 100.0
    served_level_rows: int = 32768
    # a step served at its predecessor's level x the step rate counted on the predecessor's
    # positives (stream.learn.served_ratio): the tasks, the pseudo-count, the predecessors kept, and
    # each step's own window (its delay's prior; from the settings' JOINER_WINDOW_<STEP>_MS)
    served_ratio_tasks: tuple[int, ...] = ()  # none: off
    served_ratio_pseudo_count: float = 30.0
    served_ratio_rows: int = 65536
    served_ratio_raise_only: bool = True  # the counted level may raise the live model's, not lower it
    served_ratio_min_g: float = 0.65  # predecessors whose G is under this are left out of the count
    served_ratio_prior_target: bool = True  # shrink the count towards max(own ratio, prior rates' ratio)
    step_windows_ms: tuple[int, ...] = (3_600_000, 3 * 86_400_000, 86_400_000, 14 * 86_400_000)


def held_back(impression_ids: Sequence[str], share: float) -> np.ndarray:
    """(N,) bool: the impressions of the held-back slice - a fixed ``share`` of ids, by a hash of
    the id (crc32), so every process and every restart agrees on it.

    >>> held_back(["a", "b", "c"], 0.0).tolist(), held_back(["a", "b", "c"], 1.0).tolist()
    ([False, False, False], [True, True, True])
    """
    if share <= 0:
        return np.zeros(len(impression_ids), bool)
    crc = np.fromiter(map(zlib.crc32, map(str.encode, impression_ids)), np.uint64, count=len(impression_ids))
    return crc < share * 2**32


def init_output_bias(model: AITM, rates: Sequence[float]) -> None:
    """Start the output biases at the log-odds of ``rates`` (made non-increasing along the funnel and
    kept inside (1e-6, 1 - 1e-6)) instead of 0, which is 50% on every step: the model then starts
    near the funnel's base rates instead of spending its first days - and its first versions -
    learning them. A conditional head (``head="conditional"``) starts at the step conditionals'
    log-odds, rate_t / rate_(t-1), as ESMM's heads: its end-to-end start is the same.

    >>> from aitm.model import AITMConfig
    >>> m = AITM(AITMConfig(vocab_sizes=(3,), n_tasks=2))
    >>> init_output_bias(m, (0.5, 0.1))
    >>> [round(b, 4) for b in m.head_b.tolist()]
    [0.0, -2.1972]
    """
    if len(rates) != model.config.n_tasks:
        raise ValueError(f"one prior rate per task: {len(rates)} for {model.config.n_tasks} tasks")
    p = np.clip(np.minimum.accumulate(np.asarray(rates, np.float64)), 1e-6, 1 - 1e-6)
    if model.config.head == "conditional":
        p = np.clip(p / np.concatenate(([1.0], p[:-1])), 1e-6, 1 - 1e-6)  # the step conditionals
    with torch.no_grad():
        model.head_b.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=model.head_b.dtype))


def stabilisers_from(s: Settings) -> Stabilisers:
    """The learner's stabilisers from the settings (docs/serving.md)."""
    return Stabilisers(
        min_step_rows=s.trainer_min_step_rows,
        positive_slack=s.trainer_positive_slack or None,
        positive_pace_steady=s.trainer_positive_pace == "steady",
        ema_half_life_rows=s.trainer_ema_half_life_rows,
        holdout_share=s.trainer_holdout_share,
        prior_rates=tuple(s.trainer_prior_rates) or None,
        recentre_rows=s.trainer_recentre_rows,
        delay_windows_ms=tuple(settled_after_ms(s)) if s.trainer_delay_correction != "off" else None,
        delay_max_factor=s.trainer_delay_max_factor,
        delay_in_training=s.trainer_delay_correction == "train",
        delay_prior_windows_ms=step_windows_ms(s) if s.trainer_delay_window_quantile > 0 else None,
        delay_window_quantile=s.trainer_delay_window_quantile or 0.95,
        delay_window_prior_sd=s.trainer_delay_window_prior_sd,
        delay_served_ramp=s.trainer_delay_served_ramp,
        lr_volume=VolumeScale(ref_per_day=s.trainer_lr_ref_impressions, power=s.trainer_lr_volume_power)
        if s.trainer_lr_scale == "volume" else None,
        served_level_pseudo_count=s.trainer_served_level_pseudo_count,
        served_level_rows=s.trainer_served_level_rows,
        served_level_tasks=tuple(TASKS.index(t) for t in s.trainer_served_level_tasks),
        served_ratio_tasks=tuple(sorted(TASKS.index(t) for t in s.trainer_served_ratio_tasks)),
        served_ratio_pseudo_count=s.trainer_served_ratio_pseudo_count,
        served_ratio_rows=s.trainer_served_ratio_rows,
        served_ratio_raise_only=s.trainer_served_ratio_mode == "raise",
        served_ratio_min_g=s.trainer_served_ratio_min_g,
        served_ratio_prior_target=s.trainer_served_ratio_target == "prior",
        step_windows_ms=step_windows_ms(s),
    )


def step_windows_ms(s: Settings) -> tuple[int, ...]:
    """Each step's own window, counted from its predecessor (the delay fit's window prior)."""
    return (s.joiner_window_click_ms, s.joiner_window_application_ms, s.joiner_window_approval_ms,
            s.joiner_window_activation_ms)
