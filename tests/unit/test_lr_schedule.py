"""The learning rate that follows the stream's volume (stream/learn/lr_schedule.py): the rate at
known volumes, event time only, a restart that continues the same rate, the setting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stream.contract.samples import Sample
from stream.learn.learner import OnlineLearner, Stabilisers
from stream.learn.lr_schedule import DAY_MS, HOUR_MS, VolumeRate, VolumeScale
from stream.learn.stabilisers import stabilisers_from
from stream.ops.settings import Settings

FIELDS = ("a", "b", "c")
ALL = (True, True, True, True)
BASE = 3e-3


def _steady(rate: VolumeRate, per_day: float, days: float, step_h: float = 1.0) -> list[float]:
    """A steady stream of ``per_day`` impressions a day, one round every ``step_h`` hours."""
    out = []
    for k in range(1, int(days * 24 / step_h) + 1):
        end = int(k * step_h * HOUR_MS)
        out.append(rate.observe(per_day * step_h / 24, end, end - int(step_h * HOUR_MS)))
    return out


@pytest.mark.parametrize(("per_day", "power", "factor"), [
    (4_000, 0.5, 1.0),  # the reference: TRAINER_LR itself
    (1_000, 0.5, 2.0),  # a quarter of the reference: twice the rate
    (16_000, 0.5, 0.5),
    (20_000, 0.5, math.sqrt(4_000 / 20_000)),
    (4_000, 0.75, 1.0),  # the default power
    (20_000, 0.75, 0.2 ** 0.75),  # 9.0e-4 at 20,000 a day
    (1_500, 0.75, (4_000 / 1_500) ** 0.75),  # 6.3e-3 at 1,500 a day
    (16_000, 1.0, 0.25),
    (100, 0.5, 4.0),  # clipped at 4 x TRAINER_LR
    (1_000_000, 0.5, 0.25),  # clipped at 0.25 x TRAINER_LR
])
def test_the_rate_at_a_known_steady_volume_is_the_base_rate_times_a_power_of_ref_over_volume(
        per_day: float, power: float, factor: float) -> None:
    rate = VolumeRate(BASE, VolumeScale(ref_per_day=4_000, power=power))
    lrs = _steady(rate, per_day, days=4)
    assert rate.per_day == pytest.approx(per_day, rel=1e-6)
    assert lrs[-1] == pytest.approx(BASE * factor, rel=1e-6)


@pytest.mark.parametrize("step_h", [0.25, 4.0])
def test_the_measured_volume_does_not_depend_on_how_long_the_rounds_are(step_h: float) -> None:
    # 1,500 a day comes in rounds of ~4 hours (batch 500), 20,000 a day in rounds of ~20 minutes
    rate = VolumeRate(BASE, VolumeScale())
    _steady(rate, 1_500, days=3, step_h=step_h)
    assert rate.per_day == pytest.approx(1_500, rel=1e-6)


def test_the_first_day_of_event_time_uses_the_base_rate_then_the_measured_one() -> None:
    rate = VolumeRate(BASE, VolumeScale(ref_per_day=4_000))
    lrs = _steady(rate, 16_000, days=2)
    assert lrs[:23] == [BASE] * 23  # less than a day seen: a part of the day is not the day's rate
    assert all(lr < BASE for lr in lrs[24:])


def test_only_event_time_moves_the_average_and_it_never_runs_backwards() -> None:
    a, b = VolumeRate(BASE, VolumeScale()), VolumeRate(BASE, VolumeScale())
    _steady(a, 8_000, days=2)
    _steady(b, 8_000, days=2)
    assert a.state_dict() == b.state_dict()  # a replay gets the same rates (no wall clock)
    last = a.last_ms
    a.observe(100, 0)  # a late round stamped earlier: counted, the clock stays
    assert a.last_ms == last and a.count > b.count


def test_the_volume_follows_a_change_within_a_few_days() -> None:
    rate = VolumeRate(BASE, VolumeScale(ref_per_day=4_000, power=0.5))
    _steady(rate, 4_000, days=3)
    assert rate.lr == pytest.approx(BASE, rel=1e-3)
    start = rate.last_ms
    assert start is not None
    for k in range(1, 4 * 24 + 1):  # then 16,000 a day for four days
        end = start + k * HOUR_MS
        rate.observe(16_000 / 24, end, end - HOUR_MS)
    assert rate.per_day == pytest.approx(16_000, rel=0.05)
    assert rate.lr == pytest.approx(BASE / 2, rel=0.05)


def _sample(i: int, hour: float, kind: str) -> Sample:
    rng = np.random.default_rng(i)
    feats = {f: str(int(rng.integers(0, 6))) for f in FIELDS}
    labels = tuple(int(x) for x in (rng.random(4) < [0.6, 0.4, 0.3, 0.2]).cumprod())
    seq = {"first": 0, "final": 5}[kind]
    return Sample(f"i{i}", "bank_1", int(hour * HOUR_MS), feats, labels, ALL, kind, 1000,  # type: ignore[arg-type]
                  seq)


def _rounds(per_day: int, days: int) -> list[list[Sample]]:
    """Hourly rounds of ``per_day`` impressions a day, each impression's first and final sample."""
    per_hour = per_day // 24
    out = []
    for h in range(days * 24):
        ids = range(h * per_hour, (h + 1) * per_hour)
        out.append([_sample(i, h + (i % per_hour) / per_hour, "first") for i in ids]
                   + [_sample(i, h + (i % per_hour) / per_hour, "final") for i in ids])
    return out


def _learner(scale: VolumeScale | None) -> OnlineLearner:
    torch.manual_seed(0)
    from aitm.embedding_table import DynamicTable

    return OnlineLearner(DynamicTable(FIELDS, rows=64, min_count=1, ttl_ms=10**12), mode="fnw", lr=BASE,
                         eval_window=500, stabilisers=Stabilisers(lr_volume=scale))


def test_the_learner_steps_at_the_rate_of_the_volume_on_every_parameter() -> None:
    ln = _learner(VolumeScale(ref_per_day=4_000))
    for batch in _rounds(960, days=3):  # 960 a day: (4000 / 960) ^ 0.75 = 2.92 x the base rate
        ln.step(batch)
    want = BASE * (4_000 / 960) ** 0.75
    assert ln.lr_rate is not None and ln.lr_rate.lr == pytest.approx(want, rel=0.02)
    assert ln.optimizer.lr == ln.lr_rate.lr  # the table's rows
    assert {g["lr"] for g in ln.optimizer.dense.param_groups} == {ln.lr_rate.lr}  # and every dense group
    fixed = _learner(None)
    for batch in _rounds(960, days=2):
        fixed.step(batch)
    assert fixed.optimizer.lr == BASE and {g["lr"] for g in fixed.optimizer.dense.param_groups} == {BASE}


def test_a_restart_from_the_checkpointed_state_continues_the_same_rate() -> None:
    rounds = _rounds(2_400, days=3)
    straight = _learner(VolumeScale())
    for batch in rounds:
        straight.step(batch)
    first = _learner(VolumeScale())
    for batch in rounds[:40]:
        first.step(batch)
    state = first.state_dict()
    assert state["lr_rate"]["lr"] != BASE  # past the first day: a measured rate
    resumed = _learner(VolumeScale())
    resumed.model.load_state_dict(first.model.state_dict())
    resumed.load_state_dict(state)
    assert resumed.optimizer.lr == first.optimizer.lr  # before any new round: the rate reached
    assert {g["lr"] for g in resumed.optimizer.dense.param_groups} == {first.optimizer.lr}
    for batch in rounds[40:]:
        resumed.step(batch)
    assert straight.lr_rate is not None and resumed.lr_rate is not None
    assert resumed.lr_rate.state_dict() == straight.lr_rate.state_dict()
    assert resumed.optimizer.lr == straight.optimizer.lr


def _partial_rounds(per_day: int, days: int, share_first: float, final_lag_h: int = 0) -> list[list[Sample]]:
    """Hourly rounds of ``per_day`` impressions a day where only ``share_first`` of them get a first
    sample (and a correction when clicked), every one its final ``final_lag_h`` rounds later: the
    joiner with its other lanes running ahead (a non-clicked funnel is final before its first is
    due, so it gets the final alone) or the ``matured`` policy (``share_first`` 0: finals only)."""
    per_hour = per_day // 24
    hours = days * 24
    out: list[list[Sample]] = [[] for _ in range(hours + final_lag_h)]
    every = max(1, round(1 / share_first)) if share_first > 0 else 0
    for h in range(hours):
        for i in range(h * per_hour, (h + 1) * per_hour):
            t = h + (i % per_hour) / per_hour
            if every and i % every == 0:
                out[h].append(_sample(i, t, "first"))
                s = _sample(i, t, "first")
                out[h].append(Sample(s.impression_id, s.bank_id, s.event_time_ms, s.features, s.labels, s.mature,
                                     "correction", 2000, 1))  # a correction is not an impression either
            out[h + final_lag_h].append(_sample(i, t, "final"))
    return out[:hours]  # a stream that goes on: the last hours' finals are still to come


@pytest.mark.parametrize(("share_first", "final_lag_h"), [
    (1.0, 0),  # every impression gets a first (bench online's in-process joiner)
    (0.25, 0),  # a quarter (bench serving's kept run: 26%), the others' finals in the same round
    (0.25, 5),  # ... and every final five hours after the impression, a first's final included
    (0.0, 2),  # the matured policy: finals only
])
def test_the_volume_is_the_impressions_a_day_whatever_share_of_them_got_a_first_sample(
        share_first: float, final_lag_h: int) -> None:
    # the documented rule: R is the impressions a day (each counted once, by the first sample it
    # gets of any kind), not the first samples a day - which the joiner sends for only some
    ln = _learner(VolumeScale(ref_per_day=4_000))
    for batch in _partial_rounds(2_400, days=3, share_first=share_first, final_lag_h=final_lag_h):
        ln.step(batch)
    assert ln.lr_rate is not None
    assert ln.lr_rate.per_day == pytest.approx(2_400, rel=0.03)
    assert ln.lr_rate.lr == pytest.approx(BASE * (4_000 / 2_400) ** 0.75, rel=0.03)


def test_the_setting_turns_it_on_with_its_reference_volume() -> None:
    assert stabilisers_from(Settings(trainer_lr_scale="fixed")).lr_volume is None
    assert Settings.model_fields["trainer_lr_scale"].default == "volume"  # the product's default
    st = stabilisers_from(Settings(trainer_lr_scale="volume", trainer_lr_ref_impressions=2_000))
    assert st.lr_volume == VolumeScale(ref_per_day=2_000, power=0.75)  # the default power
    st = stabilisers_from(Settings(trainer_lr_scale="volume", trainer_lr_volume_power=1.0))
    assert st.lr_volume == VolumeScale(ref_per_day=4_000, power=1.0)
    assert DAY_MS == 24 * HOUR_MS
