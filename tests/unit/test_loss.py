"""Loss functions: hand-computed values, masks and weights, and the calibrator's sign."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aitm.loss import ALPHA, aitm_loss, bce_per_task, calibrator


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_bce_and_total_match_hand_computation() -> None:
    probs = [[0.8, 0.5], [0.4, 0.6]]
    logits = torch.tensor([[_logit(p) for p in row] for row in probs])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bce = bce_per_task(logits, labels)
    task0 = -(math.log(0.8) + math.log(0.6)) / 2
    task1 = -(math.log(0.5) + math.log(0.6)) / 2
    torch.testing.assert_close(bce, torch.tensor([task0, task1]))
    # calibrator: row 1 rises by 0.2 (0.4 -> 0.6), row 0 falls; batch mean = 0.1
    torch.testing.assert_close(calibrator(torch.tensor(probs)), torch.tensor(0.1))
    total = aitm_loss(logits, labels)
    torch.testing.assert_close(total, torch.tensor(task0 + task1 + ALPHA * 0.1))
    assert ALPHA == 0.6


def test_mask_and_weight() -> None:
    logits = torch.tensor([[0.0, 0.0], [_logit(0.9), 0.0], [0.0, 0.0]])
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # task 1 fully immature
    weight = torch.tensor([[2.0, 1.0], [1.0, 1.0], [5.0, 1.0]])
    bce = bce_per_task(logits, labels, mask=mask, weight=weight)
    expected0 = (2 * math.log(2) + -math.log(0.9)) / 2  # mean over the 2 unmasked samples
    torch.testing.assert_close(bce, torch.tensor([expected0, 0.0]))


def test_alpha_zero_is_plain_bce() -> None:
    logits, labels = torch.randn(5, 3), (torch.rand(5, 3) < 0.5).float()
    torch.testing.assert_close(aitm_loss(logits, labels, alpha=0.0), bce_per_task(logits, labels).sum())


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        bce_per_task(torch.zeros(2, 3), torch.zeros(2, 2))


def test_calibrator_single_task_is_zero() -> None:
    assert calibrator(torch.rand(4, 1)).item() == 0.0


probs_rows = st.lists(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(probs_rows)
def test_calibrator_zero_iff_monotone(rows: list[list[float]]) -> None:
    p = torch.tensor(rows, dtype=torch.float64)
    monotone = torch.sort(p, dim=1, descending=True).values
    assert calibrator(monotone).item() == 0.0
    rises = (p[:, 1:] > p[:, :-1]).any()
    value = calibrator(p).item()
    assert value >= 0.0
    assert (value > 0.0) == bool(rises)


def test_calibrator_gradient_pushes_towards_monotone() -> None:
    logits = torch.tensor([[-2.0, 1.0]], requires_grad=True)  # p2 > p1: a violation
    calibrator(torch.sigmoid(logits)).backward()
    assert logits.grad is not None
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]  # descent raises p1, lowers p2


def test_each_task_is_averaged_over_its_own_unmasked_samples() -> None:
    logits = torch.tensor([[0.0, 0.0], [_logit(0.9), _logit(0.2)], [0.0, 0.0]])
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])  # task 0: three samples, task 1: one
    bce = bce_per_task(logits, labels, mask=mask)
    task0 = (math.log(2) - math.log(0.9) + math.log(2)) / 3
    task1 = -math.log(0.8) / 1  # its single sample, not halved
    torch.testing.assert_close(bce, torch.tensor([task0, task1]))


def test_integer_labels_and_boolean_masks_are_taken_as_numbers() -> None:
    logits = torch.tensor([[_logit(0.8), 0.0], [_logit(0.4), _logit(0.3)]], dtype=torch.float64)
    labels = torch.tensor([[1, 0], [0, 1]])  # int64
    mask = torch.tensor([[True, False], [True, True]])
    got = bce_per_task(logits, labels, mask=mask)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor([-(math.log(0.8) + math.log(0.6)) / 2, -math.log(0.3)],
                                                 dtype=torch.float64))


def test_the_total_loss_uses_the_mask_and_the_weights() -> None:
    probs = [[0.8, 0.5], [0.4, 0.6]]
    logits = torch.tensor([[_logit(p) for p in row] for row in probs])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    weight = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    task0 = (-3 * math.log(0.8) - math.log(0.6)) / 2
    task1 = -2 * math.log(0.6) / 1
    total = aitm_loss(logits, labels, mask, weight, alpha=0.5)
    torch.testing.assert_close(total, torch.tensor(task0 + task1 + 0.5 * 0.1))


def test_shape_mismatch_says_which_shapes() -> None:
    with pytest.raises(ValueError, match=r"^logits \(2, 3\) and labels \(2, 2\) differ$"):
        bce_per_task(torch.zeros(2, 3), torch.zeros(2, 2))
