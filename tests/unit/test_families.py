"""Simulator families: monotone labels, calibrated rates, informative truth, determinism by seed."""

from __future__ import annotations

import numpy as np
import pytest

from aitm.evaluate import auc
from simulators.families import FAMILIES, SPECS, FamilyData, FamilyWorld, ZipfFields, generate

N = 60_000


@pytest.fixture(scope="module", params=FAMILIES)
def data(request: pytest.FixtureRequest) -> FamilyData:
    return generate(request.param, N, seed=3)


def test_shapes_and_monotone_labels_and_truth(data: FamilyData) -> None:
    assert data.features.shape == (N, len(data.field_names)) and data.labels.shape == (N, 4)
    assert np.all(np.diff(data.labels, axis=1) <= 0), "a later step happened without its predecessor"
    assert np.all(np.diff(data.p_true, axis=1) <= 1e-12)
    assert np.all((data.p_true > 0) & (data.p_true < 1))


def test_rates_match_the_spec_and_the_truth_is_calibrated(data: FamilyData) -> None:
    rates = data.labels.mean(axis=0)
    want = SPECS[data.family].rates if data.family in SPECS else (0.23, 0.018, 0.013, 0.010)
    for t, (got, w) in enumerate(zip(rates, want, strict=True)):
        # binomial noise of N draws; the funnel family's rates also vary by weekday (3 days here)
        tol = 4 * np.sqrt(w * (1 - w) / N) + (0.2 if data.family == "funnel" else 0.05) * w
        assert abs(got - w) < tol, (data.family, t, got, w)
        assert abs(data.p_true[:, t].mean() - got) < tol


def test_truth_is_informative_but_not_perfect(data: FamilyData) -> None:
    for t in range(4):
        a = auc(data.labels[:, t], data.p_true[:, t])
        assert 0.7 < a < 0.99, (data.family, t, a)


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_by_seed(family: str) -> None:
    a, b, c = (
        generate(family, 3_000, seed=5),
        generate(family, 3_000, seed=5),
        generate(family, 3_000, seed=6),
    )
    assert np.array_equal(a.features, b.features) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.p_true, b.p_true)
    assert not np.array_equal(a.features, c.features)


def test_zipf_fields_span_the_declared_cardinalities() -> None:
    fields = ZipfFields(np.random.default_rng(0))
    assert len(fields.cardinalities) == 20
    assert fields.cardinalities[0] == 5 and fields.cardinalities[-1] == 20_000
    codes = fields.draw(np.random.default_rng(1), 50_000)
    assert (codes >= 0).all() and (codes < np.array(fields.cardinalities)).all()
    big = codes[:, -1]
    counts = np.sort(np.bincount(big))[::-1]
    assert counts[0] > 20 * np.median(counts[counts > 0])  # heavy head: Zipf, not uniform


def test_cascade_later_steps_are_sparse_and_carry_the_earlier_ones() -> None:
    d = generate("cascade", N, seed=3)
    rates = d.labels.mean(0)
    assert rates[3] < 0.005 and rates[2] < 0.01  # very few positives at the last steps
    # the previous step's true probability ranks the next step's labels almost as well as the
    # truth itself: steps share information (in tanh_product less so at the application step)
    world = FamilyWorld("cascade", 3)
    cond = world.conditional_probs(d.features)
    corr = np.corrcoef(np.log(cond[:, 1]), np.log(cond[:, 0]))[0, 1]
    assert corr > 0.4, corr
    assert auc(d.labels[:, 3], d.p_true[:, 2]) > 0.8


def test_adverse_approval_reverses_application() -> None:
    # adverse selection: approval's conditional falls where application's rises (cascade: rises),
    # and the later steps stay as sparse as cascade's
    adverse, cascade = FamilyWorld("adverse", 3), FamilyWorld("cascade", 3)
    d = generate("adverse", N, seed=3)
    rates = d.labels.mean(0)
    assert rates[3] < 0.005 and rates[2] < 0.01
    cond = adverse.conditional_probs(d.features)
    assert np.corrcoef(np.log(cond[:, 1]), np.log(cond[:, 2]))[0, 1] < -0.4
    cond_c = cascade.conditional_probs(generate("cascade", N, seed=3).features)
    assert np.corrcoef(np.log(cond_c[:, 1]), np.log(cond_c[:, 2]))[0, 1] > 0.4
    # so the earlier step ranks approval's labels worse than approval's own truth does
    assert auc(d.labels[:, 2], d.p_true[:, 2]) > auc(d.labels[:, 2], d.p_true[:, 1]) + 0.005


def test_unknown_family_and_bad_size_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown family"):
        generate("nope", 10)
    with pytest.raises(ValueError, match="n must be"):
        generate("cascade", 0)
