"""The served rates: the weight average's output biases re-centred on the live model's predictions,
and the cold-start delay compensation (a truncated lognormal delay fit per task, and the weight of
the positives a young stream trains on) - checked against hand-computed expectations."""

from __future__ import annotations

import copy
import doctest
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

import stream.learn.delay_model
import stream.learn.weight_average
from aitm.features import FeatureEncoder
from aitm.model import AITM, AITMConfig
from stream.contract.samples import Sample
from stream.learn.delay_model import (
    MIN_POSITIVES,
    SERVED_RAMP,
    DelayModel,
    fit_truncated_lognormal,
    lognormal_cdf,
)
from stream.learn.delayed_feedback import train_rows
from stream.learn.learner import RECENTRE_HALF_LIVES, OnlineLearner
from stream.learn.sample_batch import SampleBatch
from stream.learn.stabilisers import Stabilisers
from stream.learn.weight_average import RecentPredictions, WeightAverage, output_bias_shift

DAY = 86_400_000
FIELDS = ("a", "b", "c")


def test_doctests() -> None:
    assert doctest.testmod(stream.learn.delay_model).failed == 0
    assert doctest.testmod(stream.learn.weight_average).failed == 0


# --- re-centring the served average ------------------------------------------------------------


def noisy_iterates(k: int = 12, seed: int = 0) -> tuple[list[AITM], torch.Tensor]:
    """``k`` iterates of one model whose output weights differ (as noisy steps leave them) around a
    rare rate, and a batch of feature ids: the logits are linear in the head, so the average of
    the iterates' weights predicts the mean of their logits - below the mean of their rates."""
    torch.manual_seed(seed)
    base = AITM(AITMConfig(vocab_sizes=(6, 6, 6))).eval()
    with torch.no_grad():
        base.head_b.fill_(-4.0)  # ~2% on every task
        # a trained table's scale (not the init's 0.1): the towers' outputs, which the heads' noise
        # multiplies, then differ across impressions as a trained model's do (with zero-bias
        # Glorot towers an untrained model's outputs are too small for the heads' noise to matter)
        base.embedding.table.weight.normal_(0.0, 1.0)
    out = []
    for _ in range(k):
        m = copy.deepcopy(base)
        with torch.no_grad():
            m.head_w.add_(torch.randn_like(m.head_w) * 3.0)
            m.head_b.add_(torch.randn_like(m.head_b) * 0.5)
        out.append(m)
    ids = torch.as_tensor(np.random.default_rng(seed).integers(0, 6, size=(2000, 3)))
    return out, ids


def mean_rate(model: torch.nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model(ids)).double().mean(0).numpy()


def test_the_weight_average_is_below_the_live_rates_and_recentring_matches_them() -> None:
    iterates, ids = noisy_iterates()
    avg = WeightAverage(iterates[0], half_life=1e9)  # every iterate weighs the same: their plain mean
    for m in iterates[1:]:
        avg.update(m, rows=100)
    live = np.mean([mean_rate(m, ids) for m in iterates], axis=0)  # the average of the predictions
    before = mean_rate(avg.model, ids)
    assert (before < 0.9 * live).all(), (before, live)  # the average of weights shrinks rare rates
    delta = output_bias_shift(avg.model, ids, live.tolist(), np.ones(len(ids)))
    avg.shift_bias(delta)
    np.testing.assert_allclose(mean_rate(avg.model, ids), live, rtol=1e-4)
    assert (delta.numpy() > 0).all()
    # the shift is undone before the next update: the average itself never carries it
    head = avg.model.head_b.detach().clone()
    avg.update(iterates[0], rows=0)  # no rows: nothing happens
    assert torch.equal(avg.model.head_b, head)
    avg.unshift()
    np.testing.assert_allclose(mean_rate(avg.model, ids), before, rtol=1e-6)


def test_recentring_raises_only_and_weighs_rows_by_their_age() -> None:
    iterates, ids = noisy_iterates(k=2)
    m = iterates[0]
    now = mean_rate(m, ids)
    assert (output_bias_shift(m, ids, (now / 2).tolist(), np.ones(len(ids)), lower=False).numpy() == 0).all()
    lowered = output_bias_shift(m, ids, (now / 2).tolist(), np.ones(len(ids)))
    assert (lowered.numpy() < 0).all()
    ring = RecentPredictions(4, n_fields=3, n_tasks=4)
    ring.add(np.zeros((3, 3), np.int64), np.full((3, 4), 0.1), stamp=0.0)
    ring.add(np.ones((3, 3), np.int64), np.full((3, 4), 0.3), stamp=100.0)  # the ring keeps the newest 4
    assert ring.size == 4
    np.testing.assert_allclose(np.sort(ring.weights(now=200.0, half_life=100.0)), [0.25, 0.5, 0.5, 0.5])
    assert sorted(ring.probs[:, 0].tolist()) == pytest.approx([0.1, 0.3, 0.3, 0.3])


def first_samples(start: int, n: int, t0_ms: int, rate: float = 0.05) -> list[Sample]:
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, start + n):
        a = int(rng.integers(0, 4))
        click = int(rng.random() < rate * (1 + a))
        feats = {"a": str(a), "b": str(int(rng.integers(0, 4))), "c": str(int(rng.integers(0, 4)))}
        t = t0_ms + i * 60_000
        out.append(Sample(f"i{i}", "bank_1", t, feats, (click, 0, 0, 0), (True, False, False, False), "first",
                          1_800_000, 0, t + 1_800_000))
    return out


def test_the_learner_serves_the_average_recentred_on_its_live_predictions() -> None:
    torch.manual_seed(0)
    # a prior below the clicks' true rate (~12.5%): the live model rises, its average lags below it
    st = Stabilisers(min_step_rows=1, ema_half_life_rows=400.0, recentre_rows=600, prior_rates=(0.05, 0.01, 0.01, 0.01))
    ln = OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.05, eval_window=100,
                       stabilisers=st)
    for b in range(8):
        ln.step(first_samples(100 * b, 100, 0))
    assert ln.average is not None and ln.recent is not None and ln.recent.size == 600
    served = ln.served_model()
    w = ln.recent.weights(float(ln.trained_samples), RECENTRE_HALF_LIVES * 400.0)
    target = (w[:, None] * ln.recent.probs[:600]).sum(0) / w.sum()
    ids = torch.as_tensor(ln.recent.ids[:600])
    with torch.no_grad():
        got = (w[:, None] * torch.sigmoid(served(ids)).double().numpy()).sum(0) / w.sum()
    shift = ln.bias_shift
    assert ((shift >= 0) & (shift <= 3.0)).all()  # raised only, and at most by the guard
    assert shift[0] > 0  # clicks (the only positives here): the average was below the live rate ...
    assert got[0] == pytest.approx(target[0], rel=1e-3)  # ... and is raised to it
    # a resume serves the same model; a new step solves the shift afresh from the plain average
    again = OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.05, eval_window=100,
                          model=copy.deepcopy(served), stabilisers=st)
    again.encoder = copy.deepcopy(ln.encoder)
    again.load_state_dict(ln.state_dict())
    for k, v in served.state_dict().items():
        assert torch.equal(again.served_model().state_dict()[k], v), k
    ln.step(first_samples(900, 100, 0))
    assert ln.average.bias_shift is None  # unshifted before the update
    ln.served_model()
    assert ln.average.bias_shift is not None


# --- the delay model ---------------------------------------------------------------------------


MU, SIGMA = math.log(2 * DAY), 0.9  # activation-like: a median of 2 days
WINDOW = 19 * DAY


def cold_stream(age_days: float, per_day: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Impressions from 0 to ``age_days`` days with lognormal delays: the positives arrived by then
    (impression time, arrival time), in arrival order - right-truncated at each impression's age."""
    rng = np.random.default_rng(seed)
    n = int(per_day * age_days)
    imp = rng.uniform(0, age_days * DAY, n).astype(np.int64)
    arrival = imp + np.exp(rng.normal(MU, SIGMA, n)).astype(np.int64)
    seen = arrival <= age_days * DAY
    order = np.argsort(arrival[seen])
    return imp[seen][order], arrival[seen][order]


def true_g(age_ms: float) -> float:
    return float(lognormal_cdf(age_ms, MU, SIGMA) / lognormal_cdf(WINDOW, MU, SIGMA))


def test_the_truncated_fit_recovers_the_delay_distribution() -> None:
    imp, arrival = cold_stream(4.0, 3000)
    mu, sigma = fit_truncated_lognormal((arrival - imp).astype(np.float64), (4 * DAY - imp).astype(np.float64))
    assert abs(mu - MU) < 0.15 and abs(sigma - SIGMA) < 0.12, (mu, sigma)
    # a plain (untruncated) fit of the same delays would be far too short: the truncation matters
    assert math.exp(np.log(arrival - imp).mean()) < 0.6 * math.exp(MU)
    model = DelayModel([WINDOW], max_factor=10.0)
    model.start(0)
    for chunk in np.array_split(np.arange(imp.size), 20):  # as batches arrive
        model.observe(0, imp[chunk], arrival[chunk])
    model.advance(4 * DAY)
    model.refit(0)
    for days in (1.0, 2.0, 4.0, 8.0):
        assert float(model.cdf(0, days * DAY)) == pytest.approx(true_g(days * DAY), abs=0.05), days


def test_the_factor_is_one_over_g_capped_and_one_past_the_window() -> None:
    model = DelayModel([WINDOW], max_factor=3.0)
    model.start(10 * DAY)
    assert model.factor(0, 12 * DAY) == 1.0  # no fit yet
    imp, arrival = cold_stream(4.0, 3000)
    model.observe(0, imp + 10 * DAY, arrival + 10 * DAY)
    model.refit(0)
    g3 = float(model.cdf(0, 3 * DAY))
    assert model.factor(0, 13 * DAY) == pytest.approx(1 / g3)  # age 3 days: 1 / G(3 days), ~1.5
    assert 1.3 < 1 / g3 < 1.8
    assert model.factor(0, 10 * DAY + 3_600_000) == 3.0  # an hour old: G ~ 0, capped
    assert model.factor(0, 10 * DAY + WINDOW) == 1.0  # the window reached: steady state
    assert model.factor(0, 40 * DAY) == 1.0


def stream_batch(imp: np.ndarray, arrival: np.ndarray, start: int) -> list[Sample]:
    """First samples of impressions ``start..`` and a task-4 correction for each arrival."""
    out = []
    for i, (t, a) in enumerate(zip(imp.tolist(), arrival.tolist(), strict=True)):
        feats = {"a": str(i % 4), "b": "1", "c": "2"}
        iid = f"i{start + i}"
        out.append(Sample(iid, "bank_1", t, feats, (0, 0, 0, 0), (False,) * 4, "first", 1_800_000, 0, t + 1_800_000))
        out.append(Sample(iid, "bank_1", t, feats, (1, 1, 1, 1), (True, True, True, False), "correction", a - t, 4, a))
    return out


def delay_learner() -> OnlineLearner:
    torch.manual_seed(0)
    return OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.01, eval_window=100,
                         stabilisers=Stabilisers(delay_windows_ms=(DAY, 2 * DAY, 3 * DAY, WINDOW),
                                                 delay_max_factor=3.0, delay_in_training=True))


def test_the_learner_weights_young_positives_and_a_checkpoint_keeps_the_stream_clock() -> None:
    imp, arrival = cold_stream(3.0, 600)
    ln = delay_learner()
    t0 = 1_767_225_600_000
    chunks = np.array_split(np.arange(imp.size), 10)
    for k, chunk in enumerate(chunks):
        ln.step(stream_batch(imp[chunk] + t0, arrival[chunk] + t0, 1000 * k))
    delay = ln.delay
    assert delay is not None and ln.stream_start_ms is not None
    assert delay.start_ms == ln.stream_start_ms == t0 + int(imp[chunks[0]].min())  # the first batch's
    assert delay.fits[3] is not None and delay.seen[3] == imp.size
    f_now = delay.factor(3)
    assert 1.2 < f_now <= 3.0
    # a correction arriving now is weighted by the factor; its fake negative and a final are not
    now = delay.now_ms
    late = stream_batch(np.array([now - DAY]), np.array([now]), 99_000)
    batch = SampleBatch.from_samples(late)
    rows = train_rows("fnw", batch, np.full((2, 4), 0.01))
    plain = rows.weight.copy()
    ln._delay_weights(batch, rows)
    positive = (rows.labels[:, 3] == 1)
    np.testing.assert_allclose(rows.weight[positive, 3], plain[positive, 3] * f_now, rtol=1e-4)
    np.testing.assert_array_equal(rows.weight[~positive], plain[~positive])
    # the checkpoint round trip: the stream's start and the fits come back, the factor with them
    again = delay_learner()
    again.encoder = copy.deepcopy(ln.encoder)
    again.load_state_dict(ln.state_dict())
    assert again.stream_start_ms == ln.stream_start_ms
    assert again.delay is not None and again.delay.start_ms == delay.start_ms
    assert again.delay.factor(3) == pytest.approx(f_now)
    # ... and a batch of much later impressions does not restart the stream's clock
    later = t0 + 30 * DAY
    again.step(stream_batch(np.array([later]), np.array([later + DAY]), 50_000))
    assert again.stream_start_ms == ln.stream_start_ms
    assert again.delay.factor(3) == 1.0  # 30 days on: past the window


def test_the_trainer_exports_the_delay_factor_and_the_bias_shift(tmp_path: Path) -> None:
    from stream.learn.trainer import Trainer
    from stream.ops.settings import Settings
    from tests.unit.test_publication_gate import FakeProducer

    registry = CollectorRegistry()
    t = Trainer(Settings(data_dir=tmp_path, trainer_feature_min_count=1, trainer_embedding_rows=64,
                         trainer_min_step_rows=1, trainer_freeze_after_days=0, trainer_recentre_rows=100,
                         trainer_delay_correction="train",
                         trainer_ema_half_life_rows=200), registry)
    t._producer = FakeProducer()
    imp, arrival = cold_stream(3.0, 600)
    t0 = 1_767_225_600_000
    t._step(SampleBatch.from_samples(stream_batch(imp + t0, arrival + t0, 0)), 0, 0)
    t.learner.served_model()  # type: ignore[union-attr]
    t.update_quality_gauges()
    factor = registry.get_sample_value("aitm_trainer_delay_factor", {"task": "activation"})
    assert factor is not None and factor == pytest.approx(t.learner.delay.factor(3)) and factor > 1.0  # type: ignore[union-attr]
    assert registry.get_sample_value("aitm_trainer_delay_factor", {"task": "click"}) == 1.0  # past its window
    shift = registry.get_sample_value("aitm_trainer_served_bias_shift", {"task": "activation"})
    assert shift is not None and shift == pytest.approx(float(t.learner.bias_shift[3]))  # type: ignore[union-attr]


# --- the served correction (TRAINER_DELAY_CORRECTION=serve, the default) ----------------------


def test_the_completeness_factor_is_one_over_the_weighted_mean_of_g() -> None:
    model = DelayModel([WINDOW], max_factor=3.0)
    model.start(10 * DAY)
    at = np.array([12 * DAY, 13 * DAY, 10 * DAY + WINDOW + DAY])
    w = np.array([1.0, 3.0, 2.0])
    assert model.completeness_factor(0, at, w) == 1.0  # no fit yet: no correction
    imp, arrival = cold_stream(4.0, 3000)
    model.observe(0, imp + 10 * DAY, arrival + 10 * DAY)
    model.refit(0)
    g = [float(model.cdf(0, 2 * DAY)), float(model.cdf(0, 3 * DAY)), 1.0]  # past the window: complete
    n = model.seen[0] - MIN_POSITIVES
    ramp = n / (n + SERVED_RAMP)  # comes in as the fit firms up
    expect = (w.sum() / (w * np.array(g)).sum()) ** ramp
    assert model.completeness_factor(0, at, w) == pytest.approx(expect)
    assert 1.1 < expect < 3.0
    capped = model.completeness_factor(0, np.array([10 * DAY + 60_000]), np.ones(1))  # a minute old
    assert capped == pytest.approx(3.0**ramp)
    # a fit on few positives is applied only in part: 30 more than the first fit's, half-way (in logs)
    young = DelayModel([WINDOW], max_factor=3.0)
    young.start(10 * DAY)
    young.observe(0, imp[: MIN_POSITIVES + SERVED_RAMP] + 10 * DAY, arrival[: MIN_POSITIVES + SERVED_RAMP] + 10 * DAY)
    young.refit(0)
    full = (w.sum() / (w * np.array([float(young.cdf(0, 2 * DAY)), float(young.cdf(0, 3 * DAY)), 1.0])).sum())
    assert young.completeness_factor(0, at, w) == pytest.approx(full**0.5)
    model.advance(10 * DAY + WINDOW)
    assert model.completeness_factor(0, at, w) == 1.0  # the stream is older than the window: steady


def serve_learner() -> OnlineLearner:
    torch.manual_seed(0)
    return OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.01, eval_window=100,
                         stabilisers=Stabilisers(delay_windows_ms=(DAY, 2 * DAY, 3 * DAY, WINDOW),
                                                 delay_max_factor=3.0, ema_half_life_rows=200,
                                                 recentre_rows=2000))


def test_the_served_correction_raises_the_served_rate_and_leaves_training_alone() -> None:
    imp, arrival = cold_stream(3.0, 600)
    t0 = 1_767_225_600_000
    ln = serve_learner()
    rng = np.random.default_rng(3)
    for k, chunk in enumerate(np.array_split(np.arange(imp.size), 10)):
        # impressions that never convert (20 for each one that does): the rates are rare, as in a funnel
        quiet = np.sort(rng.uniform(imp[chunk].min(), imp[chunk].max() + 1, 20 * chunk.size).astype(np.int64)) + t0
        negatives = [Sample(f"q{k}-{i}", "bank_1", t, {"a": str(i % 4), "b": "1", "c": "2"}, (0, 0, 0, 0),
                            (False,) * 4, "first", 1_800_000, 0, t + 1_800_000) for i, t in enumerate(quiet.tolist())]
        ln.step(negatives + stream_batch(imp[chunk] + t0, arrival[chunk] + t0, 1000 * k))
    delay = ln.delay
    assert delay is not None and delay.fits[3] is not None
    # training is untouched: a positive arriving now keeps its weight
    now = delay.now_ms
    batch = SampleBatch.from_samples(stream_batch(np.array([now - DAY]), np.array([now]), 99_000))
    rows = train_rows("fnw", batch, np.full((2, 4), 0.01))
    plain = rows.weight.copy()
    ln._delay_weights(batch, rows)
    np.testing.assert_array_equal(rows.weight, plain)
    # the served model's mean on the recent impressions is the live mean x the completeness factor
    served = ln.served_model()
    recent = ln.recent
    assert recent is not None
    w = recent.weights(float(ln.trained_samples), RECENTRE_HALF_LIVES * 200)
    expect = delay.completeness_factor(3, recent.at_ms[: recent.size], w)
    assert ln.completeness[3] == pytest.approx(expect) and expect > 1.2
    live = (w[:, None] * recent.probs[: recent.size]).sum(0) / w.sum()
    assert live[3] * expect < 0.5
    x = torch.as_tensor(recent.ids[: recent.size])
    with torch.no_grad():
        p = torch.sigmoid(served(x)).double().numpy()
        unshifted = copy.deepcopy(served)
        unshifted.head_b.sub_(torch.as_tensor(ln.bias_shift, dtype=unshifted.head_b.dtype))
        p0 = torch.sigmoid(unshifted(x)).double().numpy()
    got, before = (w[:, None] * p).sum(0) / w.sum(), (w[:, None] * p0).sum(0) / w.sum()
    # raised only: to the corrected live mean, unless the average already predicts more
    assert got[3] == pytest.approx(max(live[3] * expect, before[3]), rel=1e-3)
    assert got[3] > live[3] * 1.2  # here the correction lifted it well above the live model
    # click's window (a day) is behind a 3-day-old stream: no correction there
    assert ln.completeness[0] == 1.0


def test_the_old_boolean_setting_still_reads() -> None:
    from stream.ops.settings import Settings

    assert Settings(trainer_delay_correction=True).trainer_delay_correction == "train"  # type: ignore[arg-type]
    assert Settings(trainer_delay_correction="false").trainer_delay_correction == "off"
    assert Settings().trainer_delay_correction == "serve"
    with pytest.raises(ValueError):
        Settings(trainer_delay_correction="sometimes")  # type: ignore[arg-type]


def test_the_learner_paces_late_positives_by_the_delay_models_completeness() -> None:
    """Sixth round: the mixing buffer counts each first sample at the delay model's completeness of
    its moment (``TRAINER_POSITIVE_PACE=steady``), so a cold start's queue drains at the steady
    rate; ``seen`` keeps the rate seen since the start."""
    imp, arrival = cold_stream(3.0, 600)
    t0 = 1_767_225_600_000
    chunks = np.array_split(np.arange(imp.size), 10)
    rate = {}
    for steady in (False, True):
        torch.manual_seed(0)
        ln = OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.01, eval_window=100,
                           stabilisers=Stabilisers(positive_slack=2.0, delay_windows_ms=(DAY, 2 * DAY, 3 * DAY, WINDOW),
                                                   delay_max_factor=3.0, positive_pace_steady=steady))
        for k, chunk in enumerate(chunks):
            ln.step(stream_batch(imp[chunk] + t0, arrival[chunk] + t0, 1000 * k))
        delay, mixer = ln.delay, ln.mixer
        assert delay is not None
        g = delay.completeness(3)
        assert g == pytest.approx(float(delay.cdf(3, delay.now_ms - delay.start_ms)))  # G(the stream's age)
        assert 1 / 3 <= g < 0.9
        pace = ln._pace_completeness()
        if steady:
            assert pace is not None and pace[3] == g
            assert mixer.expected[3] < 0.9 * mixer.firsts  # first samples counted at G < 1
        else:
            assert pace is None
            assert mixer.expected[3] == pytest.approx(mixer.firsts)
        rate[steady] = float(mixer.rates()[3])
    assert rate[True] > 1.1 * rate[False]  # the usual rate the queue drains at: raised by 1 / G


def test_the_learner_builds_its_delay_model_with_the_served_ramp() -> None:
    ln = OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.01, eval_window=100,
                       stabilisers=Stabilisers(delay_windows_ms=(DAY, 2 * DAY, 3 * DAY, WINDOW),
                                               delay_prior_windows_ms=(DAY, DAY, DAY, DAY), delay_served_ramp=5.0,
                                               delay_window_prior_sd=0.25))
    assert ln.delay is not None and ln.delay.prior_ramp == 5.0 and ln.delay.prior_z_sd == 0.25


# --- the served level from a delay-corrected count (seventh round) ------------------------------


def late_learner(level: bool) -> OnlineLearner:
    """A learner whose late positives wait long in the mixing buffer (a tight pace): its live model
    learns them later than they arrive, as batch-fed activation did."""
    torch.manual_seed(0)
    st = Stabilisers(positive_slack=1.0, delay_windows_ms=(DAY, 2 * DAY, 3 * DAY, WINDOW), delay_max_factor=3.0,
                     prior_rates=(0.05, 0.05, 0.05, 0.05),
                     ema_half_life_rows=200, recentre_rows=2000, served_level_tasks=(3,) if level else (),
                     served_level_pseudo_count=10.0, served_level_rows=100_000)
    return OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.01, eval_window=100,
                         stabilisers=st)


def served_mean(ln: OnlineLearner, ids: np.ndarray | None = None) -> np.ndarray:
    """(T,) the served model's mean on ``ids`` (N, F) (by default the re-centring ring's impressions)."""
    served = ln.served_model()
    assert ln.recent is not None
    x = ln.recent.ids[: ln.recent.size] if ids is None else ids
    with torch.no_grad():
        p = torch.sigmoid(served(torch.as_tensor(x))).double().numpy()
    out: np.ndarray = p.mean(0)
    return out


def funnel_batches(days: float, per_day: int, rate: float, t0: int, seed: int = 5) -> tuple[list[list[Sample]], np.ndarray]:
    """A cold stream in event-time order, cut into two-hour batches: every impression's first sample
    when it comes, and, for the ``rate`` share that activates, its correction when the activation
    arrives (the module's lognormal delay). Also the arrival times of the activations."""
    rng = np.random.default_rng(seed)
    n = int(days * per_day)
    imp = np.sort(rng.uniform(0, days * DAY, n)).astype(np.int64) + t0
    converts = rng.random(n) < rate
    arrival = imp + np.exp(rng.normal(MU, SIGMA, n)).astype(np.int64)
    events: list[tuple[int, Sample]] = []
    for i in range(n):
        t, feats = int(imp[i]), {"a": str(i % 4), "b": "1", "c": "2"}
        events.append((t, Sample(f"i{i}", "bank_1", t, feats, (0, 0, 0, 0), (False,) * 4, "first", 0, 0, t)))
        a = int(arrival[i])
        if converts[i] and a < t0 + days * DAY:
            events.append((a, Sample(f"i{i}", "bank_1", t, feats, (1, 1, 1, 1), (True, True, True, False),
                                     "correction", a - t, 4, a)))
    events.sort(key=lambda e: e[0])
    cut = np.searchsorted([e[0] for e in events], t0 + np.arange(1, int(days * 12) + 1) * DAY // 12)
    return [[e[1] for e in events[lo:hi]] for lo, hi in zip(np.r_[0, cut[:-1]], cut, strict=True)], arrival[converts]


def test_a_model_that_learns_late_positives_late_still_serves_the_counted_level() -> None:
    """One impression in 20 activates, after a 2-day lognormal delay; the live model learns the late
    positives only as the mixing buffer releases them (a tight pace). Served at the live mean x
    1 / mean G it is well below the truth; served at the count's level it is near the truth, the
    count being shrunk (arrived positives / sum of G(age now)) (served_level's module doc)."""
    t0 = 1_767_225_600_000
    batches, arrival = funnel_batches(4.0, 6000, 0.05, t0)
    got, learners = {}, {}
    for level in (False, True):
        ln = late_learner(level)
        for b in batches:
            ln.step(b)
        got[level], learners[level] = served_mean(ln), ln
    truth = 0.05
    assert sum(len(b) for b in learners[False].mixer.held[3]) > 30  # the late positives wait
    assert got[False][3] < 0.75 * truth  # served from the live model: too low
    assert 0.8 * truth < got[True][3] < 1.25 * truth  # served from the count: right
    ln = learners[True]
    assert ln.arrived is not None and ln.delay is not None
    rate, positives, sum_g = ln.served_level[3]
    assert positives == ln.arrived.positives()[3] == np.count_nonzero(arrival <= ln.delay.now_ms)
    ages = np.maximum(ln.delay.now_ms - ln.arrived.at_ms[: ln.arrived.size], 1).astype(np.float64)
    assert sum_g == pytest.approx(float(ln.delay.cdf(3, ages).sum()))
    assert served_mean(ln, ln.arrived.ids[: ln.arrived.size])[3] == pytest.approx(rate, rel=0.02)  # solved there (on a subsample)
    assert rate > positives / ln.arrived.size  # corrected for the positives still to come
    assert np.isnan(ln.served_level[0]).all()  # click is not a level task: the live model's, as before


def test_the_count_shrinks_to_the_model_mean_when_little_is_expected_and_survives_a_checkpoint() -> None:
    from stream.learn.served_level import ArrivedCounts

    c = ArrivedCounts(capacity=1000, n_tasks=2, n_fields=2)
    keys = [f"i{i}" for i in range(1000)]
    c.add(keys, np.zeros((1000, 2), np.int64), np.zeros(1000, np.int64), np.zeros((1000, 2)), np.zeros((1000, 2)),
          settled=False)
    c.credit(["i1", "i1", "i2"], np.ones((3, 2)))  # one positive per impression, however many copies
    assert c.positives().tolist() == [2, 2]
    # two positives: mostly the model's mean; with no pseudo-count the count; G is floored
    assert c.level(1, lambda at: np.ones(at.shape), 0.01, 10.0)[0] == pytest.approx((2 * 0.002 + 10 * 0.01) / 12)
    assert c.level(1, lambda at: np.full(at.shape, 0.5), 0.01, 0.0)[0] == pytest.approx(2 / 500)
    assert c.level(1, lambda at: np.full(at.shape, 0.001), 0.01, 0.0, min_mean_g=1 / 3)[2] == pytest.approx(1000 / 3)
    assert c.level(1, lambda at: np.ones(at.shape), 1e-30, 10.0)[0] == pytest.approx(2 * 0.002 / 12)  # nor a collapsed one
    # 500 impressions met only by their final, not clicked (settled, never to convert): they count in
    # the impressions, not in the mean G of those that can still convert
    c2 = ArrivedCounts(capacity=2000, n_tasks=2, n_fields=2)
    c2.load_state_dict(c.state_dict())
    c2.add([f"f{i}" for i in range(500)], np.ones((500, 2), np.int64), np.ones(500, np.int64), np.zeros((500, 2)),
           np.zeros((500, 2)), settled=True)
    assert c2.size == 1500 and c2.settled[c2.slot["f0"]] and not c2.first[c2.slot["f0"]]
    half = lambda at: np.full(at.shape, 0.5)  # noqa: E731
    assert c2.level(1, half, 0.01, 0.0)[2] == pytest.approx(1500 * 0.5)  # n x mean G over the 1,000
    assert c2.level(0, half, 0.01, 0.0)[2] == pytest.approx(1500 * 0.5)  # click: every impression can
    # a clicked one met only by its final joins the pool; many positives: the count decides
    c2.add(["g"], np.ones((1, 2), np.int64), np.ones(1, np.int64), np.ones((1, 2)), np.zeros((1, 2)), settled=True)
    assert c2.positives().tolist() == [3, 3]
    c2.credit(keys[3:500], np.ones((497, 2)))
    rate, p, s_ = c2.level(1, np.ones_like, 0.9, 10.0)
    assert (p, s_) == (500, 1501) and rate == pytest.approx((500 * 500 / 1501 + 9) / 510)
    again = ArrivedCounts(capacity=2000, n_tasks=2, n_fields=2)
    again.load_state_dict(c2.state_dict())
    assert again.positives().tolist() == c2.positives().tolist() and set(again.slot) == set(c2.slot)
    for key in ("f0", "g", "i1", "i600"):
        a, b = again.slot[key], c2.slot[key]
        assert (again.settled[a], again.first[a], again.hit[a].tolist(), again.ids[a].tolist()) == (
            c2.settled[b], c2.first[b], c2.hit[b].tolist(), c2.ids[b].tolist())


def test_the_served_level_settings_read() -> None:
    from stream.learn.stabilisers import stabilisers_from
    from stream.ops.settings import Settings

    st = stabilisers_from(Settings(trainer_served_level_tasks=["approval", "activation"]))  # type: ignore[list-item]
    assert st.served_level_tasks == (2, 3)
    assert stabilisers_from(Settings(trainer_served_level_tasks=[])).served_level_tasks == ()
