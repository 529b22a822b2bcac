"""A step served at its predecessor's served level times the step rate counted on the predecessor's
positives (stream/learn/served_ratio.py; docs/serving.md, eighth round)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

import stream.learn.keyed_ring
import stream.learn.served_ratio
from aitm.features import FeatureEncoder
from stream.contract.samples import Sample
from stream.learn.learner import RECENTRE_HALF_LIVES, OnlineLearner
from stream.learn.served_ratio import StepCounts
from stream.learn.stabilisers import Stabilisers

DAY = 86_400_000
WINDOW = 14 * DAY
T0 = 1_767_225_600_000


def test_doctests() -> None:
    for module in (stream.learn.served_ratio, stream.learn.keyed_ring):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def young_step(rate: float, days: float, per_day: int, seed: int = 0,
               median_days: float = 2.0, sigma: float = 1.1) -> tuple[np.ndarray, np.ndarray]:
    """Predecessor positives arriving uniformly over ``days``, each followed by the step's positive
    with probability ``rate`` after a lognormal delay; (predecessor arrival, step arrival or -1)."""
    rng = np.random.default_rng(seed)
    before = np.sort(rng.uniform(0, days * DAY, int(days * per_day))).astype(np.int64)
    delay = (median_days * DAY * np.exp(sigma * rng.standard_normal(before.size))).astype(np.int64)
    hit = (rng.random(before.size) < rate) & (delay < WINDOW)
    return before, np.where(hit, before + delay, -1)


def counted(before: np.ndarray, step: np.ndarray, now: int, step_settles: bool = False) -> StepCounts:
    """What a trainer would have counted by ``now``: each predecessor as it arrived, then its step
    (in a final when ``step_settles``: the last step of a funnel completes it, and the joiner sends
    the impression's final with it)."""
    c = StepCounts(capacity=100_000)
    events = sorted([(int(t), 0, i) for i, t in enumerate(before) if t <= now]
                    + [(int(t), 1, i) for i, t in enumerate(step) if 0 <= t <= now])
    for t, kind, i in events:
        c.observe([f"i{i}"], np.array([1]), np.array([kind]), np.array([t]), np.array([bool(kind) and step_settles]))
    return c


def test_at_high_volume_the_count_keeps_a_sample_of_the_whole_window_not_the_newest_hours() -> None:
    # the rule: R = A / sum G over predecessors of every age up to the step's window. A ring of the
    # newest 4,000 of 2,000 predecessors a day holds two days, whose delays it fits short and whose
    # G it gets wrong (most under 0.65 and left out); a hash sample of the window reads the rate
    rate, days, per_day = 0.5, 30.0, 2_000
    before, step = young_step(rate, days, per_day, seed=4)
    now = int(days * DAY)
    events = sorted([(int(t), 0, i) for i, t in enumerate(before)]
                    + [(int(t), 1, i) for i, t in enumerate(step) if 0 <= t <= now]
                    + [(int(t) + WINDOW, 2, i) for i, t in enumerate(before) if step[i] < 0 and t + WINDOW <= now])
    newest, sampled, every = StepCounts(4_000), StepCounts(4_000, horizon_ms=WINDOW), StepCounts(100_000)
    for t, kind, i in events:  # the predecessor, its step (the funnel's final), or its final without it
        for c in (newest, sampled, every):
            c.observe([f"i{i}"], np.array([1]), np.array([kind == 1]), np.array([t]), np.array([kind > 0]))
    args = (WINDOW, 0.95, 0.25, 0.1, 30.0, 0.65)
    assert newest.ratio(*args)[0] < 0.6 * rate
    r, a, s = sampled.ratio(*args)
    assert r == pytest.approx(rate, rel=0.1)
    assert r == pytest.approx(every.ratio(*args)[0], rel=0.05)  # what a ring holding every predecessor reads
    assert sampled.size <= 4_000 and sampled.bits >= 3  # 28,000 predecessors in the window, 1 in 8 or fewer kept
    kept = np.array([int(str(k)[1:]) for k in sampled.slot])
    assert (now - before[kept]).max() > WINDOW  # ... reaching back past the window
    # a checkpoint keeps the sample: the restored count reads the same and keeps sampling alike
    again = StepCounts(4_000, horizon_ms=WINDOW)
    again.load_state_dict(sampled.state_dict())
    assert again.bits == sampled.bits and again.ratio(*args) == pytest.approx((r, a, s))
    assert [again.sampled(f"i{i}") for i in range(200)] == [sampled.sampled(f"i{i}") for i in range(200)]


@pytest.mark.parametrize("days", [4.0, 6.0, 9.0])
def test_a_young_streams_step_rate_is_counted_on_its_own_clock(days: float) -> None:
    # the rule: of predecessors of age a_i, a step of rate R has R x sum G(a_i) positives by now;
    # the share arrived so far (A / n) is far below R while the stream is younger than the delays
    rate = 0.75
    estimates, naive = [], []
    for seed in range(8):
        before, step = young_step(rate, days, per_day=60, seed=seed)
        now = int(days * DAY)
        c = counted(before, step, now)
        r, a, s = c.ratio(WINDOW, 0.95, 0.25, own=0.1, pseudo_count=0.0)
        estimates.append(r)
        naive.append(a / c.size)
        assert s < c.size  # young predecessors count for less than one
    assert np.mean(naive) < 0.8 * rate  # what a plain count would serve
    assert np.mean(estimates) == pytest.approx(rate, rel=0.1)
    # ... and every seed's estimate is nearer the rate than its plain count
    assert all(abs(e - rate) < abs(n - rate) for e, n in zip(estimates, naive, strict=True))


@pytest.mark.parametrize("min_g", [0.0, 0.65])
@pytest.mark.parametrize("days", [4.0, 6.0, 9.0])
def test_a_positive_that_settles_its_impression_counts_at_its_age_not_as_settled(days: float, min_g: float) -> None:
    # the rule: E[A] = R x sum G(a_i) over every predecessor, converted or not. The joiner sends the
    # last step's positive in the impression's final; a converted predecessor counted as settled
    # (G = 1) where an unconverted one of the same age counts G(a) < 1 reads the rate low
    rate = 0.75
    estimates = []
    for seed in range(8):
        before, step = young_step(rate, days, per_day=60, seed=seed)
        c = counted(before, step, int(days * DAY), step_settles=True)
        estimates.append(c.ratio(WINDOW, 0.95, 0.25, own=0.1, pseudo_count=0.0, min_g=min_g)[0])
    assert np.mean(estimates) == pytest.approx(rate, rel=0.06)


@pytest.mark.parametrize("days", [7.0, 9.0])
def test_a_step_delivered_with_its_predecessor_in_a_daily_file_is_a_delay_of_zero(days: float) -> None:
    # a partner's daily file holds the day's predecessor and step positives: a step that happened
    # before its predecessor's file arrives in the same sample (untimed). Counted as converted with
    # nothing owed (G = 1), or left out, the rate reads wrong; as the delay's share at 0 it reads
    # right once the whole-day delays have a week of files behind them
    rate = 0.75
    estimates = []
    for seed in range(8):
        before, step = young_step(rate, days, per_day=60, seed=seed)
        filed_before = (before // DAY + 1) * DAY
        filed_step = np.where(step >= 0, (step // DAY + 1) * DAY, -1)
        together = filed_step == filed_before
        assert 0.05 < together.sum() / max((step >= 0).sum(), 1) < 0.5
        c = StepCounts(capacity=100_000)
        now = int(days * DAY)
        for day in range(1, int(days) + 1):
            t = day * DAY
            came = np.flatnonzero(filed_before == t)
            c.observe([f"i{i}" for i in came], np.ones(came.size, int), together[came].astype(int),
                      np.full(came.size, t), together[came])
            hit = np.flatnonzero((filed_step == t) & ~together)
            c.observe([f"i{i}" for i in hit], np.ones(hit.size, int), np.ones(hit.size, int), np.full(hit.size, t),
                      np.ones(hit.size, bool))
        estimates.append(c.ratio(WINDOW, 0.95, 0.25, own=0.1, pseudo_count=0.0, min_g=0.65)[0])
        assert c.last_hit_ms <= now
    assert np.mean(estimates) == pytest.approx(rate, rel=0.06)


def test_a_predecessor_settled_without_the_step_counts_in_full() -> None:
    # a final with no step positive: the window has passed (or the funnel ended): it cannot convert
    c = StepCounts(capacity=8)
    c.observe(["a", "b"], np.array([1, 1]), np.array([0, 0]), np.array([0, 0]), np.zeros(2, bool))
    c.observe(["c"], np.array([1]), np.array([0]), np.array([DAY]), np.zeros(1, bool))
    c.observe(["c"], np.array([1]), np.array([1]), np.array([2 * DAY]), np.zeros(1, bool))  # c converts a day later
    _, a0, s0 = c.ratio(WINDOW, 0.95, 0.25, own=0.1, pseudo_count=0.0)
    c.observe(["a"], np.array([1]), np.array([0]), np.array([2 * DAY]), np.array([True]))
    _, a1, s1 = c.ratio(WINDOW, 0.95, 0.25, own=0.1, pseudo_count=0.0)
    assert a1 == a0 and s0 < s1 < s0 + 1


def test_the_count_is_shrunk_towards_the_models_own_ratio_and_an_untimed_pair_is_counted() -> None:
    before, step = young_step(0.75, 6.0, per_day=60, seed=3)
    now = int(6 * DAY)
    c = counted(before, step, now)
    r0, a, s = c.ratio(WINDOW, 0.95, 0.25, own=0.2, pseudo_count=0.0)
    r1, _, _ = c.ratio(WINDOW, 0.95, 0.25, own=0.2, pseudo_count=s)  # as many pseudo as counted
    assert r1 == pytest.approx((a + s * 0.2) / (2 * s))
    assert 0.2 < r1 < r0
    # a final that brings both positives at once (no first sample): counted, not timed; it counts
    # its share of delay-0 arrivals, not 1 (test_a_step_delivered_with_its_predecessor_...)
    n_pairs = c.pairs()[0].size
    c.observe(["late"], np.array([1]), np.array([1]), np.array([c.last_hit_ms]), np.array([True]))
    assert c.pairs()[0].size == n_pairs
    _, a2, s2 = c.ratio(WINDOW, 0.95, 0.25, own=0.2, pseudo_count=0.0)
    assert a2 == a + 1 and s < s2 < s + 1
    # a step positive with no predecessor kept is ignored; the ring keeps the newest
    c.observe(["nobody"], np.array([0]), np.array([1]), np.array([now]), np.zeros(1, bool))
    assert "nobody" not in c.slot
    small = StepCounts(capacity=2)
    for k in range(3):
        small.observe([f"p{k}"], np.array([1]), np.array([0]), np.array([k]), np.zeros(1, bool))
    assert small.size == 2 and set(small.slot) == {"p1", "p2"}
    again = StepCounts(capacity=2)
    again.load_state_dict(small.state_dict())
    def kept(c: StepCounts) -> dict[str, int]:
        return {key: int(c.before_ms[k]) for key, k in c.slot.items()}

    assert kept(again) == kept(small) == {"p1": 1, "p2": 2}


FIELDS = ("a", "b", "c")


def funnel_stream(days: float, per_day: int, seed: int = 0) -> list[list[Sample]]:
    """A 4-step funnel whose last step (rate 0.75 of the third) arrives ~2 days late, in hourly
    batches of samples: a first sample per impression, then a correction per new positive."""
    rng = np.random.default_rng(seed)
    n = int(days * per_day)
    imp = np.sort(rng.uniform(0, days * DAY, n)).astype(np.int64)
    a = rng.integers(0, 4, n)
    p1 = 0.2 + 0.05 * a
    y1 = rng.random(n) < p1
    y2 = y1 & (rng.random(n) < 0.3)
    y3 = y2 & (rng.random(n) < 0.6)
    delay = (2 * DAY * np.exp(1.1 * rng.standard_normal(n))).astype(np.int64)
    y4 = y3 & (rng.random(n) < 0.75) & (delay < WINDOW)
    events: list[tuple[int, Sample]] = []
    for i in range(n):
        t = T0 + int(imp[i])
        feats = {"a": str(a[i]), "b": str(int(rng.integers(0, 4))), "c": "1"}
        lab = (int(y1[i]), int(y2[i]), int(y3[i]), 0)
        events.append((t + 60_000, Sample(f"i{i}", "bank_1", t, feats, lab, (True, True, True, False), "first",
                                          60_000, 0, t + 60_000)))
        if y4[i]:
            at = t + 60_000 + int(delay[i])
            events.append((at, Sample(f"i{i}", "bank_1", t, feats, (lab[0], lab[1], lab[2], 1), (True,) * 4,
                                      "correction", at - t, 4, at)))
    events.sort(key=lambda e: e[0])
    hours: dict[int, list[Sample]] = {}
    for at, s in events:
        if at <= T0 + days * DAY:
            hours.setdefault((at - T0) // 3_600_000, []).append(s)
    return [hours[h] for h in sorted(hours)]


def ratio_learner(tasks: tuple[int, ...]) -> OnlineLearner:
    torch.manual_seed(0)
    return OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.01, eval_window=100,
                         stabilisers=Stabilisers(ema_half_life_rows=200, recentre_rows=4000,
                                                 served_ratio_tasks=tasks, served_ratio_pseudo_count=10.0,
                                                 served_ratio_min_g=0.5))  # a 3-day stream: few have G >= 0.65


def served_means(ln: OnlineLearner) -> np.ndarray:
    served = ln.served_model()
    recent = ln.recent
    assert recent is not None
    w = recent.weights(float(ln.trained_samples), RECENTRE_HALF_LIVES * 200)
    with torch.no_grad():
        p = torch.sigmoid(served(torch.as_tensor(recent.ids[: recent.size]))).double().numpy()
    out: np.ndarray = (w[:, None] * p).sum(0) / w.sum()
    return out


def test_the_learner_serves_the_last_step_at_its_predecessors_level_times_the_counted_rate() -> None:
    # three days of a funnel whose last step arrives ~2 days late: the live model learns it at a
    # fraction of its rate; the counted step rate puts the served ratio near the true 0.75
    plain, counted_ln = ratio_learner(()), ratio_learner((3,))
    for batch in funnel_stream(3.0, 1500):
        plain.step(batch)
        counted_ln.step(batch)
    p_plain, p_counted = served_means(plain), served_means(counted_ln)
    assert p_plain[3] / p_plain[2] < 0.5  # the live model's own ratio: far below the step's rate
    r, a, s = counted_ln.served_ratio[3]
    assert a > 20 and s < a / 0.5  # the predecessors with G >= 0.5 only
    assert r == pytest.approx(0.75, rel=0.15)
    assert p_counted[3] / p_counted[2] == pytest.approx(r, rel=0.02)
    np.testing.assert_allclose(p_counted[:3], p_plain[:3], rtol=1e-6)  # the other steps as before
    assert np.isnan(counted_ln.served_ratio[:3]).all()
    # the counts survive a checkpoint: a restarted learner serves the same ratio
    again = ratio_learner((3,))
    again.load_state_dict(counted_ln.state_dict())
    assert again.step_counts[3].size == counted_ln.step_counts[3].size
    assert again.step_counts[3].last_hit_ms == counted_ln.step_counts[3].last_hit_ms > 0
    r2, _, _ = again.step_counts[3].ratio(WINDOW, 0.95, 0.25, 0.5, 10.0)
    r1, _, _ = counted_ln.step_counts[3].ratio(WINDOW, 0.95, 0.25, 0.5, 10.0)
    assert math.isclose(r1, r2)


def test_every_step_after_the_first_served_as_a_chain_of_counted_rates() -> None:
    # the product's default (ninth round): application, approval and activation each set at the
    # served level before it times its counted step rate - the funnel's own rates, whatever the
    # live model's learning lag
    torch.manual_seed(0)
    ln = OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.01, eval_window=100,
                       stabilisers=Stabilisers(ema_half_life_rows=200, recentre_rows=4000, served_ratio_tasks=(1, 2, 3),
                                               served_ratio_pseudo_count=10.0, served_ratio_raise_only=False,
                                               served_ratio_min_g=0.5))
    for batch in funnel_stream(3.0, 1500):
        ln.step(batch)
    served = served_means(ln)
    for t, rate in ((1, 0.3), (2, 0.6), (3, 0.75)):
        assert served[t] / served[t - 1] == pytest.approx(ln.served_ratio[t, 0], rel=0.02)
        assert ln.served_ratio[t, 0] == pytest.approx(rate, rel=0.15)
    assert (np.diff(served) < 0).all()


def test_a_small_count_is_shrunk_towards_the_configured_funnels_step_rate_not_below_it() -> None:
    # a cold model's own step rate reads low (test above); with TRAINER_PRIOR_RATES configured, a
    # count of few predecessors is shrunk towards the higher of it and the prior's step rate
    prior = (0.25, 0.075, 0.045, 0.034)
    rs = {}
    for prior_target in (True, False):
        torch.manual_seed(0)
        ln = OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.01, eval_window=100,
                           stabilisers=Stabilisers(ema_half_life_rows=200, recentre_rows=4000, prior_rates=prior,
                                                   served_ratio_tasks=(3,), served_ratio_pseudo_count=1e6,
                                                   served_ratio_prior_target=prior_target))
        for batch in funnel_stream(3.0, 1500):
            ln.step(batch)
        served = served_means(ln)
        rs[prior_target] = ln.served_ratio[3, 0]
        assert served[3] / served[2] == pytest.approx(rs[prior_target], rel=0.02)
    assert rs[True] == pytest.approx(prior[3] / prior[2], rel=0.01)
    assert rs[False] < 0.6 < rs[True]  # the model's own ratio, far below the step's 0.75


def test_the_served_ratio_settings_read() -> None:
    from stream.learn.stabilisers import stabilisers_from
    from stream.ops.settings import Settings

    st = stabilisers_from(Settings(trainer_served_ratio_tasks=["approval", "activation"]))
    assert st.served_ratio_tasks == (2, 3)
    assert st.step_windows_ms[3] == 14 * DAY
    assert stabilisers_from(Settings(trainer_served_ratio_tasks=[])).served_ratio_tasks == ()
    assert st.served_ratio_prior_target
    default = stabilisers_from(Settings())  # every step after click counted, each level set (ninth round)
    assert default.served_ratio_tasks == (1, 2, 3) and not default.served_ratio_raise_only
    assert not stabilisers_from(Settings(trainer_served_ratio_target="own")).served_ratio_prior_target
    with pytest.raises(ValueError):
        Settings(trainer_served_ratio_tasks=["click"])


def test_raise_keeps_a_live_level_above_the_count_and_set_lowers_it() -> None:
    # the same stream, then a burst of approvals that never activate, long matured: the counted
    # step rate falls far below the live model's own; "raise" keeps the live level, "set" serves the count
    served: dict[bool, np.ndarray] = {}
    for raise_only in (True, False):
        torch.manual_seed(0)
        ln = OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.01, eval_window=100,
                           stabilisers=Stabilisers(ema_half_life_rows=200, recentre_rows=4000, served_ratio_tasks=(3,),
                                                   served_ratio_pseudo_count=0.0, served_ratio_raise_only=raise_only,
                                                   served_ratio_min_g=0.5))
        for batch in funnel_stream(3.0, 1500):
            ln.step(batch)
        counts = ln.step_counts[3]
        old = counts.last_hit_ms - WINDOW  # matured: a full window ago
        n = 20 * counts.size
        counts.observe([f"never{k}" for k in range(n)], np.ones(n, bool), np.zeros(n, bool), np.full(n, old),
                       np.zeros(n, bool))
        ln._average_moved = True
        served[raise_only] = served_means(ln)
        r = ln.served_ratio[3][0]
        assert r < 0.1
    raised, set_ = served[True], served[False]
    np.testing.assert_allclose(raised[:3], set_[:3], rtol=1e-6)
    assert set_[3] / set_[2] == pytest.approx(ln.served_ratio[3][0], rel=0.02)
    assert raised[3] / raised[2] > 2 * set_[3] / set_[2]  # the live model's own level, not lowered to the count
