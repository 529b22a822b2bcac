"""An exponential moving average of a model's weights, the model the trainer serves.

Each optimizer step moves the trained model by a noisy amount; the sparse tasks (approval,
activation: 1% positives) are the noisiest, and their mean predicted rate moved by factors of 3
to 14 between versions a few seconds apart. Serving the average of the recent weights (Polyak
averaging) keeps what the steps agree on and cancels what they do not. The average is taken over
*trained rows*, not steps or seconds, so it means the same at any batch size or replay speed:
after ``half_life`` rows an old iterate weighs half. Until ``half_life`` rows have been seen it is
the plain mean of every iterate so far, so a cold start is not dragged towards the random init.

An average of weights is not an average of predictions: it smooths the logits, and in the
sigmoid's convex region (every rate below 50%) that lowers the mean rate - activation's by 10-15%
(docs/serving.md). ``RecentPredictions`` keeps the live model's own predictions on the recent
impressions; ``output_bias_shift`` finds, and ``WeightAverage.shift_bias`` applies, the shift of
the served model's output bias of each task (logit space, one scalar per task: the order of the
rows is untouched) that makes its mean prediction on those impressions equal theirs (weighted by
age: ``OnlineLearner.served_model``).

>>> import torch
>>> m = torch.nn.Linear(1, 1, bias=False)
>>> _ = m.weight.data.fill_(0.0)
>>> avg = WeightAverage(m, half_life=100)
>>> _ = m.weight.data.fill_(1.0)
>>> avg.update(m, rows=100)  # the first update: the average is the model itself
>>> _ = m.weight.data.fill_(3.0)
>>> avg.update(m, rows=100)  # two iterates of 100 rows each: their plain mean
>>> round(avg.model.weight.item(), 3)
2.0
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


class WeightAverage:
    """A frozen copy of ``model`` whose parameters follow the model's, averaged over trained rows."""

    def __init__(self, model: nn.Module, half_life: float, lazy: str | None = None) -> None:
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0 rows, got {half_life}")
        self.half_life = half_life
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.rows = 0  # rows averaged so far
        self._mine: list[torch.Tensor] = list(self.model.parameters())  # (walking the modules costs more
        self._theirs: tuple[nn.Module, list[torch.Tensor]] | None = None  # than the update itself)
        self.bias_shift: torch.Tensor | None = None  # added to the average's ``head_b`` (re-centring)
        names = [n for n, _ in self.model.named_parameters()]
        if lazy is not None and lazy not in names:
            raise ValueError(f"no parameter {lazy!r} to average lazily; one of {names}")
        self.lazy = lazy
        self._lazy_at = names.index(lazy) if lazy is not None else -1
        self.log_keep = 0.0  # sum of log(keep) over every update (the lazy rows' clock)
        n_rows = self._mine[self._lazy_at].shape[0] if lazy is not None else 0
        self.row_log_keep = torch.zeros(n_rows, dtype=torch.float64)  # (V,) the clock at each row's last update

    def _their_params(self, model: nn.Module) -> list[torch.Tensor]:
        if self._theirs is None or self._theirs[0] is not model:
            self._theirs = (model, [p.detach() for p in model.parameters()])
        return self._theirs[1]

    @torch.no_grad()
    def catch_up(self, model: nn.Module, touched: torch.Tensor) -> None:
        """Before a step changes the ``touched`` rows of the lazy table: move their average where
        the dense average would be now (towards the trained rows, constant since their last
        update, by the keep factors of the updates in between)."""
        if self.lazy is None or touched.numel() == 0:
            return
        mine, theirs = self._mine[self._lazy_at], self._their_params(model)[self._lazy_at]
        at = touched.to(mine.device)
        factor = torch.exp(self.log_keep - self.row_log_keep[touched.cpu()]).to(mine)  # (R,) in (0, 1]
        w = theirs[at]  # (R, d)
        mine[at] = w + (mine[at] - w) * factor[:, None]
        self.row_log_keep[touched.cpu()] = self.log_keep

    @torch.no_grad()
    def update(self, model: nn.Module, rows: int, touched: torch.Tensor | None = None) -> None:
        """Fold in ``model`` as it is after a step on ``rows`` rows; with ``touched`` (the lazy
        table's rows the step changed, already ``catch_up``-ed), only those rows of that table."""
        if rows <= 0:
            return
        self.unshift()  # the average itself never carries a shift: it is solved afresh each time
        keep = min(0.5 ** (rows / self.half_life), self.rows / (self.rows + rows))
        theirs = self._their_params(model)
        if touched is None or self.lazy is None:
            torch._foreach_lerp_(self._mine, theirs, 1.0 - keep)
            self.log_keep += math.log(max(keep, 1e-300))
            self.row_log_keep.fill_(self.log_keep)  # every row moved: all in step
        else:
            k = self._lazy_at
            if len(self._mine) > 1:
                torch._foreach_lerp_(self._mine[:k] + self._mine[k + 1 :], theirs[:k] + theirs[k + 1 :], 1.0 - keep)
            at = touched.to(self._mine[k].device)
            self._mine[k][at] = torch.lerp(self._mine[k][at], theirs[k][at], 1.0 - keep)
            self.log_keep += math.log(max(keep, 1e-300))
            self.row_log_keep[touched.cpu()] = self.log_keep
        for b_avg, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_avg.copy_(b)
        self.rows += rows

    @torch.no_grad()
    def set_rows(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Rows of the lazy table set to ``values`` in the average (rows recycled for new values,
        set to the same in the trained model): in step with it from now."""
        if self.lazy is None:
            raise ValueError("no lazy table")
        mine = self._mine[self._lazy_at]
        mine[rows.to(mine.device)] = values.to(mine)
        self.row_log_keep[rows.cpu()] = self.log_keep

    @torch.no_grad()
    def shift_bias(self, delta: torch.Tensor) -> None:
        """Serve the average with ``head_b`` + ``delta`` (per task, logits) until the next update."""
        self.unshift()
        head_b: torch.Tensor = self.model.head_b  # type: ignore[assignment]
        head_b.add_(delta.to(head_b))
        self.bias_shift = delta.detach().clone().to(head_b)

    @torch.no_grad()
    def unshift(self) -> None:
        if self.bias_shift is not None:
            head_b: torch.Tensor = self.model.head_b  # type: ignore[assignment]
            head_b.sub_(self.bias_shift)
            self.bias_shift = None

    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}, "rows": self.rows,
                "bias_shift": None if self.bias_shift is None else self.bias_shift.clone(),
                "log_keep": self.log_keep, "row_log_keep": self.row_log_keep.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])  # as served: the shift included
        self.rows = int(state["rows"])
        shift = state.get("bias_shift")
        self.bias_shift = None if shift is None else torch.as_tensor(shift).clone()
        # an average from before the lazy rows: every row taken as in step now
        self.log_keep = float(state.get("log_keep", 0.0))
        stamps = state.get("row_log_keep")
        if stamps is not None and len(stamps) == len(self.row_log_keep):
            self.row_log_keep = torch.as_tensor(stamps, dtype=torch.float64).clone()
        else:
            self.row_log_keep.fill_(self.log_keep)


class RecentPredictions:
    """A ring of the newest ``capacity`` trained impressions: encoded features (F,), the live model's
    prediction made before training on them (T,), and the trained-row count then (the age stamp)."""

    def __init__(self, capacity: int, n_fields: int, n_tasks: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.ids = np.zeros((capacity, n_fields), np.int64)
        self.probs = np.zeros((capacity, n_tasks), np.float64)
        self.stamp = np.zeros(capacity, np.float64)
        self.at_ms = np.zeros(capacity, np.int64)  # event time each prediction was made at
        self.size = 0
        self._next = 0

    def add(self, ids: np.ndarray, probs: np.ndarray, stamp: float, at_ms: np.ndarray | int = 0) -> None:
        """Rows ``ids`` (N, F) with the live predictions ``probs`` (N, T) at trained-row count ``stamp``,
        made at event times ``at_ms`` ((N,) or one for all)."""
        n = ids.shape[0]
        if n == 0:
            return
        when = np.broadcast_to(np.asarray(at_ms, np.int64), (n,))
        if n >= self.capacity:
            ids, probs, when, n = ids[-self.capacity :], probs[-self.capacity :], when[-self.capacity :], self.capacity
        at = (self._next + np.arange(n)) % self.capacity
        self.ids[at], self.probs[at], self.stamp[at], self.at_ms[at] = ids, probs, stamp, when
        self._next = int((self._next + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def weights(self, now: float, half_life: float) -> np.ndarray:
        """(size,) each kept row's weight: 0.5 ** (age in trained rows / half_life)."""
        age = np.maximum(now - self.stamp[: self.size], 0.0)
        out: np.ndarray = 0.5 ** (age / half_life)
        return out


@torch.no_grad()
def output_bias_shift(model: nn.Module, ids: torch.Tensor, target: Sequence[float], weights: np.ndarray,
                      steps: int = 8, lower: bool = True) -> torch.Tensor:
    """The shift of ``model.head_b`` (per task, logit space; (T,)) that makes the ``weights``-weighted
    mean of sigmoid(model(ids)) equal ``target`` per task. Newton steps on each
    task's one scalar (the mean of a sigmoid is increasing in the bias, so it converges in a few).
    ``lower=False``: only raise a bias (a shift below 0 is clamped to 0).

    A model whose heads are step conditionals (AITM with ``head="conditional"``: p_t = p_(t-1) *
    sigmoid(c_t)) has each bias move its step and every later one: the shifts are found step by
    step along the funnel, each with the earlier steps' shifts in place (``_conditional_shift``).
    """
    was = model.training
    model.eval()
    conditional = getattr(getattr(model, "config", None), "head", "joint") == "conditional"
    head_logits = getattr(model, "head_logits", None)
    logits = (head_logits(ids) if conditional and head_logits is not None else model(ids)).double()  # (N, T)
    model.train(was)
    w = torch.as_tensor(weights, dtype=torch.float64, device=logits.device)
    w = w / w.sum()
    goal = torch.as_tensor(np.clip(np.asarray(target, np.float64), 1e-6, 1 - 1e-6), device=logits.device)
    if conditional:
        return _conditional_shift(logits, w, goal, steps, lower)
    delta = torch.zeros(logits.shape[1], dtype=torch.float64, device=logits.device)
    for _ in range(steps):
        p = torch.sigmoid(logits + delta)  # (N, T)
        gap = (w[:, None] * p).sum(0) - goal  # (T,)
        slope = (w[:, None] * p * (1 - p)).sum(0).clamp_min(1e-12)
        delta = (delta - gap / slope).clamp(-3.0 if lower else 0.0, 3.0)  # at most e^3: a guard, not a limit
    return delta


def _conditional_shift(cond: torch.Tensor, w: torch.Tensor, goal: torch.Tensor, steps: int,
                       lower: bool) -> torch.Tensor:
    """The shifts (T,) of step-conditional logits ``cond`` (N, T) that bring the ``w``-weighted mean
    of p_t = prod_{s<=t} sigmoid(c_s + d_s) to ``goal`` (T,): Newton on d_t for t = 1..T in turn,
    the shifts of the steps before in place (dp_t / dd_t = p_t * (1 - sigmoid(c_t + d_t)))."""
    delta = torch.zeros(cond.shape[1], dtype=torch.float64, device=cond.device)
    log_before = torch.zeros(cond.shape[0], dtype=torch.float64, device=cond.device)  # (N,) log p_(t-1)
    for t in range(cond.shape[1]):
        for _ in range(steps):
            c = cond[:, t] + delta[t]  # (N,)
            p = torch.exp(log_before + torch.nn.functional.logsigmoid(c))  # (N,) p_t
            gap = (w * p).sum() - goal[t]
            slope = (w * p * torch.sigmoid(-c)).sum().clamp_min(1e-12)
            delta[t] = (delta[t] - gap / slope).clamp(-3.0 if lower else 0.0, 3.0)
        log_before = log_before + torch.nn.functional.logsigmoid(cond[:, t] + delta[t])
    return delta
