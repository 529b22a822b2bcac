"""ID churn in the simulator: new user and creative IDs every day, old ones retiring."""

from __future__ import annotations

import numpy as np

from simulators.funnel import FunnelSimulator, SimConfig


def test_ids_ever_seen_are_many_times_those_of_a_day() -> None:
    sim = FunnelSimulator(SimConfig(seed=1, impressions_per_day=2000, churn=0.1))
    cols = [sim.field_names.index(n) for n in ("user_id", "creative_id")]
    ever: set[tuple[int, int]] = set()
    per_day = []
    for day in range(0, 60, 3):  # every third day of 60
        feats = sim.day_batch(day).features
        today = {(c, int(v)) for c in cols for v in feats[:, c]}
        per_day.append(len(today))
        ever |= today
    assert len(ever) > 4 * np.mean(per_day)
    # later generations carry new codes, and the world stays calibrated (rates near the targets)
    batch = sim.day_batch(40)
    assert batch.features[:, cols[0]].max() >= sim.cardinalities[cols[0]]  # later generations
    rates = batch.p_true.mean(axis=0)
    assert 0.15 < rates[0] < 0.32 and 0.005 < rates[3] < 0.02


def test_no_churn_keeps_every_code_within_its_cardinality() -> None:
    sim = FunnelSimulator(SimConfig(seed=1, impressions_per_day=2000))
    feats = sim.day_batch(50).features
    assert (feats < np.asarray(sim.cardinalities)).all()
    assert np.array_equal(sim.hidden_codes(feats), feats)
