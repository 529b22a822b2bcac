"""The simulator's invariants: monotone labels, rates, delays, determinism, faults, drift."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections import Counter

import numpy as np
import pytest

from aitm.evaluate import auc
from simulators.faults import CORRUPTING, FaultConfig, SimulatedStream
from simulators.funnel import DAY_MS, WINDOWS_MS, FunnelSimulator, SimConfig
from stream.contract.events import InvalidEvent, parse_event


@pytest.fixture(scope="module")
def big() -> tuple[FunnelSimulator, object]:
    sim = FunnelSimulator(SimConfig(seed=11, impressions_per_day=50_000))
    return sim, sim.dataset(8)


def test_labels_are_monotone_and_probabilities_too(big: tuple) -> None:
    _, b = big
    assert np.all(np.diff(b.labels, axis=1) <= 0)
    assert np.all(np.diff(b.p_true, axis=1) <= 1e-12)
    assert np.all((b.p_true > 0) & (b.p_true < 1))


def test_positive_rates_near_the_paper(big: tuple) -> None:
    _, b = big
    rates = b.labels.mean(axis=0)
    for got, want in zip(rates, (0.23, 0.018, 0.013, 0.010), strict=True):
        assert abs(got - want) / want < 0.12, (rates, want)
    # the truth's probabilities are calibrated: mean p ~ observed rate
    assert np.allclose(b.p_true.mean(axis=0), rates, rtol=0.1)


def test_oracle_is_informative_but_not_perfect(big: tuple) -> None:
    _, b = big
    for t in range(4):
        a = auc(b.labels[:, t], b.p_true[:, t])
        assert 0.7 < a < 0.99


def test_delays_follow_the_funnel(big: tuple) -> None:
    _, b = big
    d, h = b.delays_ms, b.happened.astype(bool)
    click, app, appr, act = (d[h[:, t], t] / 1000 for t in range(4))
    assert 5 < np.median(click) < 120  # seconds
    assert 300 < np.median(app) < 7_200  # minutes to hours
    assert 10 < np.median(appr) < 600  # seconds to minutes
    assert 86_400 < np.median(act) < 5 * 86_400  # days
    late = (act > 14 * 86_400).mean()
    assert 0.01 < late < 0.10  # a few activations fall after day 14
    # every step reaches its window's edge, on both sides, and exactly on it; a step after its
    # window counts as a negative (and so does every step after it), one on the edge counts
    for t, window in enumerate(WINDOWS_MS):
        dt = d[:, t][h[:, t]]
        near = np.abs(dt - window) <= 15 * 60_000
        assert (near & (dt <= window)).sum() >= 5 and (near & (dt > window)).sum() >= 5, t
        assert (dt == window).any() and (dt == window + 1).any(), t
        pred = np.ones(len(h), bool) if t == 0 else b.labels[:, t - 1] == 1
        after = h[:, t] & pred & (d[:, t] > window)
        on_edge = h[:, t] & pred & (d[:, t] == window)
        assert (b.labels[after, t:] == 0).all() and (b.labels[on_edge, t] == 1).all()


def test_banks_differ_in_approval_propensity(big: tuple) -> None:
    _, b = big
    per_bank = [b.labels[b.bank == k, 2].sum() / max(b.labels[b.bank == k, 1].sum(), 1) for k in range(6)]
    assert max(per_bank) - min(per_bank) > 0.1


def test_deterministic_per_seed() -> None:
    a = FunnelSimulator(SimConfig(seed=3, impressions_per_day=500)).day_batch(2)
    b = FunnelSimulator(SimConfig(seed=3, impressions_per_day=500)).day_batch(2)
    c = FunnelSimulator(SimConfig(seed=4, impressions_per_day=500)).day_batch(2)
    assert np.array_equal(a.features, b.features) and np.array_equal(a.labels, b.labels)
    assert a.impression_ids == b.impression_ids
    assert not np.array_equal(a.features, c.features)


def test_drift_changes_the_hidden_function_but_not_the_rates() -> None:
    sim = FunnelSimulator(SimConfig(seed=5, impressions_per_day=20_000, drift=0.05))
    b = sim.day_batch(0)
    p0 = sim.conditional_probs(b.features, 0)[:, 0]
    p30 = sim.conditional_probs(b.features, 30)[:, 0]
    assert np.corrcoef(p0, p30)[0, 1] < 0.6
    late = sim.day_batch(30)
    assert abs(late.labels[:, 0].mean() - b.labels[:, 0].mean()) < 0.03
    still = FunnelSimulator(SimConfig(seed=5, impressions_per_day=20_000))
    assert np.allclose(still.conditional_probs(b.features, 0), still.conditional_probs(b.features, 30))


def test_stream_is_in_delivery_order_and_valid() -> None:
    sim = FunnelSimulator(SimConfig(seed=2, impressions_per_day=3_000))
    stream = SimulatedStream(sim, days=2, tail_days=1)
    recs = list(stream)
    assert all(a.deliver_ms <= b.deliver_ms for a, b in itertools.pairwise(recs))
    counts = Counter(r.step for r in recs)
    assert counts["impression"] == 2 * 3_000 + 200
    for rec in recs:
        ev = parse_event(rec.value, rec.step)
        assert ev.impression_id.encode() == rec.key and ev.event_time_ms == rec.timestamp_ms
    # the events agree with the truth: a step's event exists iff it happened
    truth = {t.impression_id: t for t in stream.truth}
    by_imp: dict[str, set[str]] = {}
    for rec in recs:
        by_imp.setdefault(rec.key.decode(), set()).add(rec.step)
    for iid, t in truth.items():
        for task, y in zip(("click", "application", "approval", "activation"), t.labels, strict=True):
            if y:
                assert task in by_imp[iid]


def test_fault_rates_and_marks() -> None:
    sim = FunnelSimulator(SimConfig(seed=9, impressions_per_day=20_000))
    stream = SimulatedStream(sim, days=1, faults=FaultConfig.uniform(0.02))
    recs = list(stream)
    kinds = Counter(f.kind for f in stream.faults)
    n = 20_000
    # duplicate and malformed apply to every impression; the others need a click
    assert abs(kinds["duplicate"] / n - 0.02) < 0.006
    assert abs(kinds["malformed"] / n - 0.02) < 0.006
    clicked = sum(t.labels[0] for t in stream.truth)
    for kind in ("out_of_order", "illegal", "late"):
        assert abs(kinds[kind] / clicked - 0.02) < 0.012, (kind, kinds[kind], clicked)
    corrupted = {t.impression_id for t in stream.truth if t.corrupted}
    assert corrupted == {f.impression_id for f in stream.faults if f.kind in CORRUPTING}
    # malformed records really fail to parse, with the reason the truth expects
    raw_by_event: dict[str, list[bytes]] = {}
    for rec in recs:
        with contextlib.suppress(InvalidEvent):
            raw_by_event.setdefault(parse_event(rec.value).event_id, []).append(rec.value)
    reasons = Counter()
    for rec in recs:
        try:
            parse_event(rec.value)
        except InvalidEvent as exc:
            reasons[exc.reason] += 1
    expected = Counter(f.expected_reason for f in stream.faults if f.kind == "malformed")
    assert reasons == expected
    # duplicates share the event id; out-of-order events come before their predecessor
    dup_ids = {f.event_id for f in stream.faults if f.kind == "duplicate"}
    assert all(len(raw_by_event[e]) == 2 for e in dup_ids)
    order = {(r.key, r.step): i for i, r in enumerate(recs)}
    steps = ("impression", "click", "application", "approval", "activation")
    for f in stream.faults:
        if f.kind == "out_of_order":
            prev = steps[steps.index(f.step) - 1]
            assert order[(f.impression_id.encode(), f.step)] < order[(f.impression_id.encode(), prev)]
        if f.kind == "illegal":
            prev = steps[steps.index(f.step) - 1]
            assert (f.impression_id.encode(), prev) not in order
        if f.kind == "late":
            rec = recs[order[(f.impression_id.encode(), f.step)]]
            assert rec.deliver_ms - rec.timestamp_ms >= 20 * DAY_MS
    assert json.dumps([f.expected_reason for f in stream.faults])  # serialisable


def test_carry_reverses_approval_on_application_and_keeps_the_rates() -> None:
    # the adverse world (docs/models.md): approval's conditional carries application's with a
    # negative weight, so the two fall and rise against each other; the rates are still solved
    plain = FunnelSimulator(SimConfig(seed=3, impressions_per_day=20_000))
    adverse = FunnelSimulator(SimConfig(seed=3, impressions_per_day=20_000, carry=(0.5, -0.8, 0.5)))
    b = plain.day_batch(0)
    corr = {}
    for name, sim in (("plain", plain), ("adverse", adverse)):
        lc = np.log(sim.conditional_probs(b.features, 0))
        corr[name] = np.corrcoef(lc[:, 1], lc[:, 2])[0, 1]
        assert np.allclose(sim.day_batch(1).labels.mean(0), plain.day_batch(1).labels.mean(0), rtol=0.25)
    assert corr["plain"] > 0 and corr["adverse"] < -0.2, corr
