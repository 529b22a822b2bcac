"""Training losses as pure functions: masked/weighted BCE per task plus the paper's calibrator."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ALPHA = 0.6  # the paper's weight of the Behavioral Expectation Calibrator


def bce_per_task(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean binary cross-entropy of each task, (T,).

    ``mask`` (B, T), 1 where the label is usable (mature), 0 where it is not yet known;
    ``weight`` (B, T), a per-sample correction (e.g. fake-negative weighting). The mean is
    over the unmasked samples of each task; a task with none contributes 0. ``counts`` (T,):
    the unmasked samples each mean is over when the batch is a shard of a larger one (several
    data-parallel ranks: the whole batch's counts), default this batch's.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")  # (B, T)
    if weight is not None:
        loss = loss * weight
    if mask is None:
        return loss.mean(0)  # (T,)
    m = mask.to(logits.dtype)  # (B, T)
    n = m.sum(0) if counts is None else counts.to(logits.dtype)  # (T,)
    return (loss * m).sum(0) / n.clamp_min(1.0)  # (T,)


def calibrator(probs: torch.Tensor) -> torch.Tensor:
    """Behavioral Expectation Calibrator: batch mean of sum_t max(p_t - p_{t-1}, 0); scalar.

    Zero exactly when every row of ``probs`` (B, T) is non-increasing along the funnel.
    """
    if probs.shape[1] < 2:
        return probs.new_zeros(())
    rise = torch.relu(probs[:, 1:] - probs[:, :-1])  # (B, T-1)
    return rise.sum(1).mean()


def aitm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    alpha: float = ALPHA,
) -> torch.Tensor:
    """L = sum_t BCE_t + alpha * calibrator(sigmoid(logits)); scalar. alpha = 0 gives plain BCE."""
    total = bce_per_task(logits, labels, mask, weight).sum()
    if alpha:
        total = total + alpha * calibrator(torch.sigmoid(logits))
    return total
