"""Which training rows go into each optimizer step: late positives are paced against the impression flow.

Fake-negative weighting trains every impression at once as a negative and its late conversions
later, as positive-only rows. In a steady stream the two arrive side by side, so every batch holds
both in their usual proportion. When they do not - after the last impression only late
conversions arrive (the tail), and a partner's daily activation file brings a day of positives at
02:00 - a batch of positives with no negatives around them pushes the whole model up: the tail of
a run predicted activation 50x too high (docs/serving.md). ``MixingBuffer`` keeps every batch's mix
close to the stream's usual one:

- rows that come with the impression flow (first samples, their positive copies, finals trained
  as labelled rows) are ready at once;
- a late positive row (a ``correction``) waits in its task's queue and is released at most at
  ``slack`` x the task's usual rate of late positives per first sample, measured over the last
  ``half_life`` first samples; so a burst is spread over the impressions that follow it, and with
  no new impressions (the tail) nothing is released - the positives wait, checkpointed, for the
  negatives they belong with. No row is ever dropped: over time every positive is trained once,
  with the weight it arrived with; only its timing changes;
- *usual* means the steady rate: while a stream is younger than a task's delay its late positives
  arrive at only G(age) of it (``stream.learn.delay_model``), and the rate seen since the start
  trails the growing rate - paced at 2 x that average, a cold start's queue held about a day of
  activations that the delay model had counted as arrived (docs/serving.md, sixth round). So the
  caller may say, with each batch, the ``completeness`` G of each task's arrivals now: a first
  sample then counts as G of one in the rate's denominator (1, the default, once the stream is
  older than the delay);
- an optimizer step needs ``min_rows`` ready rows: a quiet stream gathers small batches into
  one step instead of taking a full Adam step on a handful of rows.

>>> buf = MixingBuffer(n_tasks=2, min_rows=3, slack=2.0, half_life=100.0)
>>> negatives = RowBlock.of(np.zeros((2, 1), np.int64), np.zeros((2, 2)))
>>> buf.add(negatives, np.array([-1, -1]), n_first=2) is None  # 2 rows < min_rows
True
>>> late = RowBlock.of(np.ones((4, 1), np.int64), np.array([[0.0, 1.0]] * 4), mask=np.array([[0.0, 1.0]] * 4))
>>> buf.add(late, np.array([1, 1, 1, 1]), n_first=0) is None  # no impressions came: the positives wait
True
>>> buf.held_rows
4
>>> len(buf.add(negatives, np.array([-1, -1]), n_first=2))  # 2 + 2 ready, 3 released (~1 per first x slack 2 x 2)
7
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class RowBlock:
    """Training rows: feature ids (R, F) int64, labels, mask, weight (R, T) float32, and ``origin``
    (R,) int64: a row's position in the batch it came with, -1 once it has waited in the buffer."""

    ids: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    weight: np.ndarray
    origin: np.ndarray

    @classmethod
    def of(cls, ids: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None,
           weight: np.ndarray | None = None, origin: np.ndarray | None = None) -> RowBlock:
        y = np.asarray(labels, np.float32)
        ones = np.ones_like(y)
        return cls(np.asarray(ids, np.int64), y, ones if mask is None else np.asarray(mask, np.float32),
                   ones if weight is None else np.asarray(weight, np.float32),
                   np.full(len(y), -1, np.int64) if origin is None else np.asarray(origin, np.int64))

    @classmethod
    def empty(cls, n_fields: int, n_tasks: int) -> RowBlock:
        return cls.of(np.zeros((0, n_fields), np.int64), np.zeros((0, n_tasks), np.float32))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, index: np.ndarray | slice) -> RowBlock:
        return RowBlock(*(getattr(self, f)[index] for f in _FIELDS))

    def waited(self) -> RowBlock:
        """The same rows with no batch position: they now come from the buffer."""
        return replace(self, origin=np.full(len(self), -1, np.int64))

    @staticmethod
    def concat(blocks: Sequence[RowBlock]) -> RowBlock:
        parts = [b for b in blocks if len(b)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return blocks[0]
        return RowBlock(*(np.concatenate([getattr(b, f) for b in parts]) for f in _FIELDS))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f: torch.from_numpy(np.ascontiguousarray(getattr(self, f))) for f in _FIELDS[:4]}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RowBlock:
        return cls.of(*(np.asarray(state[f]) for f in _FIELDS[:4]))


_FIELDS = ("ids", "labels", "mask", "weight", "origin")


class MixingBuffer:
    """Ready rows, per-task queues of late positives, and the pace at which the queues drain."""

    def __init__(self, n_tasks: int, min_rows: int = 1, slack: float = 2.0, half_life: float = 20_000.0,
                 max_held: int = 200_000) -> None:
        if min_rows < 1 or slack <= 0 or half_life <= 0:
            raise ValueError(f"min_rows >= 1, slack > 0 and half_life > 0 required, got {min_rows}, {slack}, {half_life}")
        self.n_tasks = n_tasks
        self.min_rows = min_rows
        self.slack = slack
        self.half_life = half_life
        self.max_held = max_held  # beyond it the oldest late positives are released anyway (never dropped)
        self.ready: list[RowBlock] = []
        self.held: list[list[RowBlock]] = [[] for _ in range(n_tasks)]
        self.arrived = np.zeros(n_tasks)  # late positives that arrived, decayed per first sample
        self.firsts = 0.0  # first samples, decayed the same way
        self.expected = np.zeros(n_tasks)  # ... each counted at the completeness of its moment
        self.budget = np.zeros(n_tasks)  # late positives each task may still release

    @property
    def held_rows(self) -> int:
        return sum(len(b) for q in self.held for b in q)

    @property
    def ready_rows(self) -> int:
        return sum(len(b) for b in self.ready)

    def rates(self) -> np.ndarray:
        """(T,) late positives per first sample at their steady rate, as measured so far (the
        arrivals over the first samples, each counted at the completeness it came with)."""
        return np.where(self.expected > 0, self.arrived / np.maximum(self.expected, 1e-300), 0.0)

    def _after(self, late_counts: np.ndarray, n_first: int,
               completeness: np.ndarray | None) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """(firsts, expected, arrived, budget) once a batch with ``late_counts`` (T,) late positives
        and ``n_first`` first samples, whose tasks' arrivals were ``completeness`` (T,) of their
        steady rate (None: 1), is added - the pace, before any release."""
        g = np.ones(self.n_tasks) if completeness is None else np.asarray(completeness, np.float64)
        if g.shape != (self.n_tasks,) or not ((g > 0) & (g <= 1)).all():
            raise ValueError(f"one completeness in (0, 1] per task, got {g}")
        decay = 0.5 ** (n_first / self.half_life)
        firsts = self.firsts * decay + n_first
        expected = self.expected * decay + n_first * g
        arrived = self.arrived * decay + late_counts
        rates = np.where(expected > 0, arrived / np.maximum(expected, 1e-300), 0.0)
        allowance = self.slack * rates * n_first  # (T,)
        # carry at most one row (or one batch's allowance) over: idle stretches must not save up
        # a budget that lets a whole burst through at once
        budget = np.minimum(self.budget + allowance, np.maximum(allowance, 1.0))
        return firsts, expected, arrived, budget

    def upcoming(self, late_task: np.ndarray, n_first: int, completeness: np.ndarray | None = None) -> RowBlock | None:
        """The rows already here that ``add`` with the same arguments will put into the next step,
        in the order it will (rows ready from earlier batches, then each task's released queue
        head), so that a caller can run them through the model in the same pass as the batch;
        None when there are none."""
        counts = np.bincount(np.asarray(late_task)[np.asarray(late_task) >= 0], minlength=self.n_tasks)[: self.n_tasks]
        _, _, _, budget = self._after(counts.astype(np.float64), n_first, completeness)
        parts = list(self.ready)
        if n_first > 0:
            for t in range(self.n_tasks):
                want = int(budget[t])
                for block in self.held[t]:
                    if want <= 0:
                        break
                    parts.append(block.take(slice(0, want)))
                    want -= min(want, len(block))
        parts = [b.waited() for b in parts if len(b)]
        return RowBlock.concat(parts) if parts else None

    def add(self, rows: RowBlock, late_task: np.ndarray, n_first: int,
            completeness: np.ndarray | None = None) -> RowBlock | None:
        """Take a batch's training rows (``late_task[i]``: the task row ``i`` is a late positive of,
        or -1), the number of first samples the batch brought and (optionally) the completeness of
        each task's arrivals now (see the module doc); return the rows of the next optimizer step,
        or None while fewer than ``min_rows`` are ready. Rows of this batch keep their ``origin``;
        rows that waited have none."""
        late_task = np.asarray(late_task, np.int64)
        if late_task.shape != (len(rows),):
            raise ValueError(f"one task (or -1) per row: {late_task.shape} for {len(rows)} rows")
        counts = np.bincount(late_task[late_task >= 0], minlength=self.n_tasks)[: self.n_tasks]
        self.firsts, self.expected, self.arrived, self.budget = self._after(counts.astype(np.float64), n_first,
                                                                            completeness)
        self.ready = [b.waited() for b in self.ready]
        self.held = [[b.waited() for b in q] for q in self.held]
        self.ready.append(rows.take(late_task < 0))
        for t in range(self.n_tasks):
            mine = rows.take(late_task == t)
            if len(mine):
                self.held[t].append(mine)
        if n_first > 0:  # late positives go out only beside new impressions
            for t in range(self.n_tasks):
                self._release(t, int(self.budget[t]))
        excess = self.held_rows - self.max_held
        for t in range(self.n_tasks):
            if excess <= 0:
                break
            excess -= self._release(t, min(excess, sum(len(b) for b in self.held[t])), spend=False)
        if self.ready_rows < self.min_rows:
            return None
        out = RowBlock.concat(self.ready)
        self.ready = []
        return out

    def _release(self, t: int, n: int, spend: bool = True) -> int:
        """Move up to ``n`` of task ``t``'s oldest held rows to the ready rows."""
        queue, done = self.held[t], 0
        while queue and done < n:
            block = queue[0]
            k = min(len(block), n - done)
            self.ready.append(block.take(slice(0, k)))
            if k == len(block):
                queue.pop(0)
            else:
                queue[0] = block.take(slice(k, None))
            done += k
        if spend:
            self.budget[t] -= done
        return done

    def state_dict(self) -> dict[str, Any]:
        return {
            "ready": [b.state_dict() for b in self.ready],
            "held": [[b.state_dict() for b in q] for q in self.held],
            "arrived": self.arrived.tolist(),
            "firsts": self.firsts,
            "expected": self.expected.tolist(),
            "budget": self.budget.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ready = [RowBlock.from_state_dict(b) for b in state["ready"]]
        self.held = [[RowBlock.from_state_dict(b) for b in q] for q in state["held"]]
        self.arrived = np.asarray(state["arrived"], np.float64)
        self.firsts = float(state["firsts"])
        # a checkpoint from before the completeness: every first sample counted as one
        self.expected = np.asarray(state.get("expected", [self.firsts] * self.n_tasks), np.float64)
        self.budget = np.asarray(state["budget"], np.float64)
