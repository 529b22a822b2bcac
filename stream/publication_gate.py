"""The validation gate before publication, and the figures of the version being served.

A held-back slice of impressions (``learner.held_back``: a fixed share of impression ids, by hash)
is never trained on, by any version. Their matured finals - final labels, every task settled - go
to ``HoldoutWindow``, a ring buffer of the most recent ones. Each candidate version is scored on
that window exactly as the scorer would serve it (``projection.funnel_order``), next to the version
being served, on the same rows:

- **log loss**: refused when a task's mean log loss is worse than the serving version's by more
  than ``log_loss_margin`` (relative) *and* by more than 3 standard errors of the paired
  per-row difference - clearly worse, not noise;
- **calibration** (mean predicted / observed rate): refused when a task's calibration is off by a
  factor more than ``calibration_margin`` worse than the serving version's (|ln c| grows by more
  than ln(margin)) *and* that error is beyond 3 standard errors of ln c (~1/sqrt(positives)) -
  with only a handful of positives the gate cannot tell, and does not block.

With fewer than ``min_rows`` rows in the window (a cold start), or with nothing served yet, a
candidate is published: the gate judges only what it can measure. Both versions are judged on
rows neither trained on, so the comparison is honest; the window holds the most recent *matured*
finals, which in a steady stream arrive in the proportions of the impressions themselves.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from stream.projection import funnel_order

REASONS: Final = ("log_loss", "calibration")
_EPS: Final = 1e-7


@dataclass(frozen=True)
class TaskFigures:
    """Per task (T,): mean log loss, calibration (mean predicted / observed rate) and positives."""

    log_loss: list[float]
    calibration: list[float]
    positives: list[int]
    rows: int


@dataclass(frozen=True)
class Verdict:
    """The gate's decision on one candidate; ``reason`` (one of ``REASONS``) and ``task`` when refused."""

    publish: bool
    reason: str | None = None
    task: int | None = None
    detail: str = ""
    candidate: TaskFigures | None = None
    serving: TaskFigures | None = None


def figures(probs: np.ndarray, labels: np.ndarray) -> TaskFigures:
    """Log loss and calibration per task of (N, T) served probabilities against (N, T) labels."""
    p = np.clip(probs.astype(np.float64), _EPS, 1 - _EPS)
    y = labels.astype(np.float64)
    ll = -(y * np.log(p) + (1 - y) * np.log1p(-p))  # (N, T)
    pos = y.sum(axis=0)
    cal = [float(p[:, t].sum() / pos[t]) if pos[t] > 0 else math.nan for t in range(y.shape[1])]
    return TaskFigures([float(x) for x in ll.mean(axis=0)], cal, [int(x) for x in pos], len(y))


def _row_log_loss(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    p = np.clip(probs.astype(np.float64), _EPS, 1 - _EPS)
    y = labels.astype(np.float64)
    out: np.ndarray = -(y * np.log(p) + (1 - y) * np.log1p(-p))  # (N, T)
    return out


def judge(cand: np.ndarray, serving: np.ndarray, labels: np.ndarray, log_loss_margin: float,
          calibration_margin: float) -> Verdict:
    """Compare two versions' served probabilities (N, T) on the same labelled rows (N, T).

    >>> y = np.zeros((1000, 1)); y[:100] = 1
    >>> good = np.full((1000, 1), 0.1)
    >>> judge(good, good, y, 0.05, 1.5).publish
    True
    >>> v = judge(np.full((1000, 1), 0.6), good, y, 0.05, 1.5)  # a blown-up candidate
    >>> v.publish, v.reason
    (False, 'log_loss')
    """
    ll_c, ll_s = _row_log_loss(cand, labels), _row_log_loss(serving, labels)  # (N, T)
    fc, fs = figures(cand, labels), figures(serving, labels)
    n = len(labels)
    for t in range(labels.shape[1]):
        d = ll_c[:, t] - ll_s[:, t]
        mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
        if mean > log_loss_margin * fs.log_loss[t] and mean > 3 * se:
            return Verdict(False, "log_loss", t, f"task {t}: log loss {fc.log_loss[t]:.4f} against the serving "
                           f"version's {fs.log_loss[t]:.4f} (+{mean:.4f}, 3 s.e. {3 * se:.4f})", fc, fs)
    for t in range(labels.shape[1]):
        c, s, pos = fc.calibration[t], fs.calibration[t], fc.positives[t]
        if pos == 0 or not (c > 0 and s > 0):
            continue
        err_c, err_s = abs(math.log(c)), abs(math.log(s))
        if err_c - err_s > math.log(calibration_margin) and err_c > 3 / math.sqrt(pos):
            return Verdict(False, "calibration", t, f"task {t}: calibration {c:.3f} against the serving "
                           f"version's {s:.3f} ({pos} positives)", fc, fs)
    return Verdict(True, candidate=fc, serving=fs)


class HoldoutWindow:
    """The most recent ``capacity`` matured finals of held-back impressions: ids (N, F), labels (N, T)."""

    def __init__(self, capacity: int, n_tasks: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.n_tasks = n_tasks
        self.ids: np.ndarray | None = None  # (capacity, F), allocated at the first add
        self.labels = np.zeros((capacity, n_tasks), np.int8)
        self._next = 0
        self.size = 0
        self.total = 0  # rows ever added

    def add(self, ids: np.ndarray, labels: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if self.ids is None or self.ids.shape[1] != ids.shape[1]:
            self.ids = np.zeros((self.capacity, ids.shape[1]), np.int64)
            self._next = self.size = 0
        self.total += len(ids)
        if len(ids) > self.capacity:
            ids, labels = ids[-self.capacity:], labels[-self.capacity:]
        at = (self._next + np.arange(len(ids))) % self.capacity
        self.ids[at] = ids
        self.labels[at] = (np.asarray(labels) > 0).astype(np.int8)
        self._next = int((self._next + len(ids)) % self.capacity)
        self.size = min(self.capacity, self.size + len(ids))

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N, F), labels (N, T)) now held (ring order: no figure depends on it)."""
        if self.ids is None:
            return np.zeros((0, 0), np.int64), np.zeros((0, self.n_tasks), np.int8)
        return self.ids[: self.size], self.labels[: self.size]

    def state_dict(self) -> dict[str, Any]:
        ids, labels = self.rows()
        return {"ids": torch.from_numpy(ids.copy()), "labels": torch.from_numpy(labels.copy()), "total": self.total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ids = np.asarray(state["ids"], np.int64)
        self.ids, self._next, self.size = None, 0, 0
        if ids.ndim == 2 and len(ids):
            self.add(ids, np.asarray(state["labels"]))
        self.total = int(state.get("total", self.size))


@dataclass
class Served:
    """The version being served, as the gate scores it: its model and the feature ids it knew."""

    version: int
    model: nn.Module
    vocab_sizes: list[int] | None  # per field; ids admitted later are out-of-vocabulary to it


class PublicationGate:
    """Judges candidate versions against the served one on the holdout window."""

    def __init__(self, window: HoldoutWindow, min_rows: int = 500, log_loss_margin: float = 0.05,
                 calibration_margin: float = 1.5, device: str | torch.device = "cpu") -> None:
        self.window = window
        self.min_rows = min_rows
        self.log_loss_margin = log_loss_margin
        self.calibration_margin = calibration_margin
        self.device = torch.device(device)
        self.serving: Served | None = None

    def _probs(self, model: nn.Module, ids: np.ndarray, vocab_sizes: Sequence[int] | None) -> np.ndarray:
        x = ids if vocab_sizes is None else np.where(ids > np.asarray(vocab_sizes), 0, ids)  # ids start at 1
        with torch.inference_mode():
            model.eval()
            p = torch.sigmoid(model(torch.as_tensor(x, device=self.device))).float().cpu().numpy()
        return funnel_order(p)

    def judge(self, model: nn.Module) -> Verdict:
        """May ``model`` (the candidate, knowing every id admitted so far) be published?"""
        ids, labels = self.window.rows()
        if self.serving is None or len(labels) < self.min_rows:
            return Verdict(True, detail=f"not judged: {len(labels)} held-back finals, serving "
                                        f"{'none' if self.serving is None else self.serving.version}")
        cand = self._probs(model, ids, None)
        serving = self._probs(self.serving.model, ids, self.serving.vocab_sizes)
        return judge(cand, serving, labels, self.log_loss_margin, self.calibration_margin)

    def published(self, version: int, model: nn.Module, vocab_sizes: Sequence[int] | None) -> None:
        """``model`` (copied) is now the version being served."""
        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        self.serving = Served(version, frozen, list(vocab_sizes) if vocab_sizes is not None else None)

    def serving_figures(self) -> TaskFigures | None:
        """Log loss and calibration of the version being served on the holdout window (None
        before a version or a held-back final)."""
        ids, labels = self.window.rows()
        if self.serving is None or len(labels) == 0:
            return None
        return figures(self._probs(self.serving.model, ids, self.serving.vocab_sizes), labels)
