"""Delayed feedback (``stream.learn.delayed_feedback.train_rows``): every expected row written by hand
from the rules in the module's documentation (final-only; fake-negative weighting, Ktena et al.)."""

from __future__ import annotations

import numpy as np
import pytest

from stream.contract.samples import Sample
from stream.learn.delayed_feedback import train_rows
from stream.learn.sample_batch import SampleBatch

NO = (False, False, False, False)
ALL = (True, True, True, True)


def s(i: int, kind: str, labels: tuple[int, int, int, int], mature: tuple[bool, ...] = NO, seq: int = 0) -> Sample:
    return Sample(f"i{i}", "b", 0, {"f": "x"}, labels, mature, kind, 0, seq)  # type: ignore[arg-type]


P = np.array([
    [0.5, 0.25, 0.125, 0.0625],
    [0.4, 0.3, 0.2, 0.1],
    [0.8, 0.6, 0.4, 0.2],
    [0.9, 0.7, 0.5, 0.3],
    [0.1, 0.1, 0.1, 0.1],
])


def test_final_only_trains_finals_with_their_mature_mask_and_unit_weight() -> None:
    batch = [
        s(0, "first", (1, 0, 0, 0), (True, False, False, False)),
        s(1, "final", (1, 1, 0, 0), (True, True, True, False), seq=5),
        s(2, "correction", (1, 1, 0, 0), ALL, seq=2),
        s(3, "final", (0, 0, 0, 0), ALL, seq=5),
    ]
    rows = train_rows("final-only", batch, P[:4])
    assert rows.index.tolist() == [1, 3]
    assert rows.labels.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    assert rows.mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert rows.weight.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert len(rows) == 2
    assert rows.index.dtype == np.int64
    assert rows.labels.dtype == rows.mask.dtype == rows.weight.dtype == np.float32


def test_fnw_first_samples_enter_as_fake_negatives_and_positives_again() -> None:
    # i0: first, no positive yet -> one fake negative on every task
    # i1: first, click already positive -> fake negative, then a positive copy on click only
    batch = [s(0, "first", (0, 0, 0, 0)), s(1, "first", (1, 0, 0, 0), (True, False, False, False))]
    p = P[:2]
    rows = train_rows("fnw", batch, p)
    assert rows.index.tolist() == [0, 1, 1]  # batch order; the fake negative before its positive copy
    assert rows.labels.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert rows.mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    # negatives weighted (1 - p)(1 + p), positives (1 + p), p the model's own prediction
    np.testing.assert_allclose(rows.weight[0], [0.75, 1 - 0.0625, 1 - 0.015625, 1 - 0.00390625], rtol=1e-6)
    np.testing.assert_allclose(rows.weight[1], [0.84, 0.91, 0.96, 0.99], rtol=1e-6)
    np.testing.assert_allclose(rows.weight[2], [1.4, 1.3, 1.2, 1.1], rtol=1e-6)


@pytest.mark.parametrize(("seq", "task"), [(1, 0), (2, 1), (3, 2), (4, 3)])
def test_fnw_a_correction_credits_the_task_of_the_step_it_reached(seq: int, task: int) -> None:
    labels = tuple(1 if k <= task else 0 for k in range(4))
    rows = train_rows("fnw", [s(0, "correction", labels, seq=seq)], P[2:3])  # type: ignore[arg-type]
    onehot = [0.0] * 4
    onehot[task] = 1.0
    assert rows.index.tolist() == [0]
    assert rows.labels.tolist() == [onehot]
    assert rows.mask.tolist() == [onehot]
    assert rows.weight[0][task] == pytest.approx(1 + P[2][task])


@pytest.mark.parametrize("seq", [0, 5, -1, 9])
def test_fnw_a_correction_with_a_seq_outside_the_steps_trains_nothing(seq: int) -> None:
    assert len(train_rows("fnw", [s(0, "correction", (1, 1, 1, 1), seq=seq)], P[:1])) == 0


def test_fnw_a_correction_whose_task_is_not_positive_trains_nothing() -> None:
    assert len(train_rows("fnw", [s(0, "correction", (1, 0, 0, 0), seq=2)], P[:1])) == 0


def test_fnw_finals_train_only_where_their_first_sample_was_never_seen() -> None:
    batch = [
        s(0, "final", (1, 1, 0, 0), (True, True, True, False), seq=5),
        s(1, "final", (1, 0, 0, 0), ALL, seq=5),
        s(2, "first", (0, 0, 0, 0)),
    ]
    assert train_rows("fnw", batch, P[:3]).index.tolist() == [2]  # first_seen unknown: finals evaluated only
    assert train_rows("fnw", batch, P[:3], first_seen=[True, True, True]).index.tolist() == [2]
    rows = train_rows("fnw", batch, P[:3], first_seen=[False, True, True])
    assert rows.index.tolist() == [0, 2]
    assert rows.labels.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    assert rows.mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]  # the final's own mature flags
    assert rows.weight[0].tolist() == [1, 1, 1, 1]  # a plain labelled row


def test_fnw_weights_clip_the_prediction_to_a_probability() -> None:
    batch = [s(0, "first", (1, 1, 0, 0), (True, True, False, False))]
    rows = train_rows("fnw", batch, np.array([[1.5, -0.5, 1.0, 0.0]]))
    np.testing.assert_allclose(rows.weight[0], [0.0, 1.0, 0.0, 1.0])  # (1 - p)(1 + p), p in [0, 1]
    np.testing.assert_allclose(rows.weight[1], [2.0, 1.0, 2.0, 1.0])  # 1 + p


def test_rows_of_an_interleaved_batch_follow_the_batch_order() -> None:
    batch = [
        s(0, "correction", (1, 1, 0, 0), seq=2),
        s(1, "first", (1, 0, 0, 0), (True, False, False, False)),
        s(2, "final", (0, 0, 0, 0), ALL, seq=5),
        s(3, "first", (0, 0, 0, 0)),
        s(4, "correction", (1, 0, 0, 0), seq=1),
    ]
    rows = train_rows("fnw", SampleBatch.from_samples(batch), P, first_seen=[True, True, False, True, True])
    assert rows.index.tolist() == [0, 1, 1, 2, 3, 4]
    assert rows.labels.tolist() == [
        [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0],
    ]
    assert rows.weight[0][1] == pytest.approx(1.25)  # 1 + P[0][1]
    assert rows.weight[5][0] == pytest.approx(1.1)  # 1 + P[4][0]


def test_an_empty_batch_has_no_rows() -> None:
    for mode in ("final-only", "fnw"):
        rows = train_rows(mode, [], np.zeros((0, 4)), first_seen=[])
        assert len(rows) == 0 and rows.labels.shape == (0, 4) and rows.weight.shape == (0, 4)


def test_bad_arguments_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"probs must be \(1, 4\), got \(2, 4\)"):
        train_rows("fnw", [s(0, "first", (0, 0, 0, 0))], np.zeros((2, 4)))
    with pytest.raises(ValueError, match="unknown delayed-feedback mode 'fnv'"):
        train_rows("fnv", [s(0, "first", (0, 0, 0, 0))], np.zeros((1, 4)))


def test_fnw_keeps_each_fake_negative_before_its_positive_copy_in_a_large_batch() -> None:
    # ties in the batch index: the order must be stable whatever the batch size (numpy sorts
    # small arrays stably even with an unstable sort; 600 rows are not small)
    n = 300
    batch = [s(i, "first", (1, 0, 0, 0), (True, False, False, False)) for i in range(n)]
    rows = train_rows("fnw", batch, np.full((n, 4), 0.5))
    assert rows.index.tolist() == [i // 2 for i in range(2 * n)]
    assert rows.labels[0::2].sum() == 0 and rows.labels[1::2, 0].tolist() == [1.0] * n
    np.testing.assert_allclose(rows.weight[0::2, 0], 0.75)
    np.testing.assert_allclose(rows.weight[1::2, 0], 1.5)


def test_fnw_a_correction_with_a_very_negative_seq_trains_nothing_and_does_not_fail() -> None:
    assert len(train_rows("fnw", [s(0, "correction", (1, 1, 1, 1), seq=-9)], P[:1])) == 0
