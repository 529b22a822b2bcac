"""The validation gate before publication, and the figures of the version being served.

A held-back slice of impressions (``learner.held_back``: a fixed share of impression ids, by hash)
is never trained on, by any version. ``HoldoutSet`` keeps them with their labels so far; each task
is judged on the newest held-back impressions old enough for that task's label to be settled
(chosen by age, never by label). Each candidate version is scored on them exactly as the scorer
would serve it (``projection.funnel_order``), next to the version being served, on the same rows:

- **log loss**: refused when a task's mean log loss is worse than the serving version's by more
  than ``log_loss_margin`` (relative) *and* by more than 3 standard errors of the paired
  per-row difference - clearly worse, not noise;
- **calibration** (mean predicted / observed rate): refused when a task's calibration is off by a
  factor more than ``calibration_margin`` worse than the serving version's (|ln c| grows by more
  than ln(margin)) *and* that error is beyond 3 standard errors of ln c (~1/sqrt(positives)) -
  with only a handful of positives the gate cannot tell, and does not block.

A task with fewer than ``min_rows`` settled impressions (a cold start: activation needs 15 days)
is not judged, and with nothing served yet a candidate is published: the gate judges only what it
can measure. Both versions are judged on rows neither trained on, so the comparison is honest.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from aitm.projection import funnel_order
from stream.learn.sample_batch import N_TASKS
from stream.ops.settings import Settings

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


class HoldoutSet:
    """Held-back impressions (never trained on) with their labels so far, and which of them each
    task can be judged on.

    Every sample of a held-back impression (first, correction, final) updates its labels (a
    label only ever turns positive). Task ``t``'s label is settled - positive, or its window
    closed - once the impression is ``horizons_ms[t]`` old (the step windows up to ``t`` plus the
    allowed lateness), whatever its labels: so task ``t`` is judged on the newest ``per_task``
    impressions at least that old. Choosing by age, never by label, keeps the sample honest: the
    joiner's *finals* would not do, since a final waits for every later step (an approved
    impression's final comes 14 days on), so recent finals are mostly impressions that converted
    nowhere and favour a model that under-predicts."""

    def __init__(self, horizons_ms: Sequence[int], per_task: int = 5000, capacity: int = 50_000) -> None:
        self.horizons_ms = [int(h) for h in horizons_ms]
        self.per_task = per_task
        self.capacity = capacity
        self.now_ms = 0  # the stream's event time (the newest watermark seen)
        self._rows: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}  # id -> (ids (F,), labels (T,), event ms)
        self._evicted_at = 0  # size after the last eviction (it runs as the set grows by a tenth)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, impression_ids: Sequence[str], ids: np.ndarray, labels: np.ndarray, event_ms: np.ndarray,
            now_ms: int) -> None:
        """Samples of held-back impressions: encoded features (N, F), labels (N, T), impression times."""
        rows = self._rows
        for i, iid in enumerate(impression_ids):
            old = rows.get(iid)
            y = np.asarray(labels[i], np.int8)
            rows[iid] = (ids[i], y if old is None else np.maximum(old[1], y), int(event_ms[i]))
        self.now_ms = max(self.now_ms, int(now_ms))
        if len(rows) > self._evicted_at + max(100, self._evicted_at // 10):
            self._evict()

    def _evict(self) -> None:
        """Keep what a task may still be judged on: every impression younger than the longest
        horizon, the newest ``per_task`` older ones, and no more than ``capacity`` in all (the
        oldest go first; rows come in about time order, so they are at the front)."""
        rows = self._rows
        cut = self.now_ms - max(self.horizons_ms, default=0)
        old = sum(1 for _, _, e in rows.values() if e <= cut)
        while rows and (old > self.per_task or len(rows) > self.capacity):
            first = next(iter(rows))
            old -= rows.pop(first)[2] <= cut
        self._evicted_at = len(rows)

    def settled(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (M, F), labels (M,)) of the newest ``per_task`` impressions whose task-``t`` label is settled."""
        cut = self.now_ms - self.horizons_ms[t]
        picked = [(e, ids, y[t]) for ids, y, e in self._rows.values() if e <= cut]
        picked.sort(key=lambda r: r[0])
        picked = picked[-self.per_task:]
        if not picked:
            return np.zeros((0, 0), np.int64), np.zeros(0, np.int8)
        return np.stack([r[1] for r in picked]), np.array([r[2] for r in picked], np.int8)

    def counts(self) -> list[int]:
        """Impressions each task can be judged on now."""
        return [len(self.settled(t)[1]) for t in range(len(self.horizons_ms))]

    def state_dict(self) -> dict[str, Any]:
        keys = list(self._rows)
        rows = list(self._rows.values())
        return {
            "impression_ids": keys,
            "ids": torch.from_numpy(np.stack([r[0] for r in rows]) if rows else np.zeros((0, 0), np.int64)),
            "labels": torch.from_numpy(np.stack([r[1] for r in rows]) if rows else np.zeros((0, 0), np.int8)),
            "event_ms": [r[2] for r in rows],
            "now_ms": self.now_ms,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ids, labels = np.asarray(state["ids"]), np.asarray(state["labels"])
        self._rows = {k: (ids[i], labels[i], int(e))
                      for i, (k, e) in enumerate(zip(state["impression_ids"], state["event_ms"], strict=True))}
        self.now_ms = int(state["now_ms"])
        self._evicted_at = len(self._rows)


Known = Callable[[np.ndarray], np.ndarray]


def _below(ids: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    return np.where(ids > sizes, 0, ids)  # threshold ids start at 1, in order


@dataclass
class Served:
    """The version being served, as the gate scores it: its model and the feature ids it knew."""

    version: int
    model: nn.Module
    known: Known | None  # maps ids given after this version to out-of-vocabulary (None: all known)


class PublicationGate:
    """Judges candidate versions against the served one on the held-back impressions."""

    def __init__(self, holdout: HoldoutSet, min_rows: int = 500, log_loss_margin: float = 0.1,
                 calibration_margin: float = 1.5, device: str | torch.device = "cpu") -> None:
        self.holdout = holdout
        self.min_rows = min_rows
        self.log_loss_margin = log_loss_margin
        self.calibration_margin = calibration_margin
        self.device = torch.device(device)
        self.serving: Served | None = None

    def _probs(self, model: nn.Module, ids: np.ndarray, known: Known | None) -> np.ndarray:
        x = ids if known is None else known(ids)
        with torch.inference_mode():
            model.eval()
            p = torch.sigmoid(model(torch.as_tensor(x, device=self.device))).float().cpu().numpy()
        return funnel_order(p)

    def judge(self, model: nn.Module) -> Verdict:
        """May ``model`` (the candidate, knowing every id admitted so far) be published? Each task
        is judged on its own settled impressions, once there are ``min_rows`` of them."""
        if self.serving is None:
            return Verdict(True, detail="not judged: nothing served yet")
        judged = False
        for t in range(len(self.holdout.horizons_ms)):
            ids, y = self.holdout.settled(t)
            if len(y) < self.min_rows:
                continue
            judged = True
            cand = self._probs(model, ids, None)[:, t : t + 1]
            serving = self._probs(self.serving.model, ids, self.serving.known)[:, t : t + 1]
            v = judge(cand, serving, y.reshape(-1, 1), self.log_loss_margin, self.calibration_margin)
            if not v.publish:
                return Verdict(False, v.reason, t, v.detail.replace("task 0", f"task {t}"), v.candidate, v.serving)
        return Verdict(True, detail="" if judged else f"not judged: fewer than {self.min_rows} settled "
                                                      "held-back impressions on every task")

    def published(self, version: int, model: nn.Module, known: Known | Sequence[int] | None) -> None:
        """``model`` (copied) is now the version being served; ``known`` maps the ids the encoder
        gave after it to OOV (``encoder.known_as_of`` bound to its ``marker()`` now), or is the
        ids per field a threshold encoder knew (later ones are above them)."""
        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        if known is not None and not callable(known):
            sizes = np.asarray(list(known))
            known = partial(_below, sizes=sizes)
        self.serving = Served(version, frozen, known)

    def serving_figures(self) -> TaskFigures | None:
        """Log loss and calibration per task of the version being served, each task on its settled
        held-back impressions (NaN for a task with none yet; None before a version)."""
        if self.serving is None:
            return None
        ll, cal, pos, rows = [], [], [], []
        for t in range(len(self.holdout.horizons_ms)):
            ids, y = self.holdout.settled(t)
            if len(y) == 0:
                ll.append(math.nan)
                cal.append(math.nan)
                pos.append(0)
                rows.append(0)
                continue
            f = figures(self._probs(self.serving.model, ids, self.serving.known)[:, t : t + 1], y.reshape(-1, 1))
            ll.append(f.log_loss[0])
            cal.append(f.calibration[0])
            pos.append(f.positives[0])
            rows.append(f.rows)
        return TaskFigures(ll, cal, pos, sum(rows))


DAY_MS = 86_400_000


def settled_after_ms(s: Settings) -> list[int]:
    """Per task, the impression age after which its label is settled and delivered whatever
    happened: the step windows up to it, the joiner's lateness, grace and first-sample delay, and a
    day for partners that deliver in batches (a daily activation file arrives up to 26 h late)."""
    windows = (s.joiner_window_click_ms, s.joiner_window_application_ms, s.joiner_window_approval_ms,
               s.joiner_window_activation_ms)
    slack = s.joiner_allowed_lateness_ms + s.joiner_grace_ms + s.joiner_observe_ms + DAY_MS
    return [sum(windows[: t + 1]) + slack for t in range(N_TASKS)]
