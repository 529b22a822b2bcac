"""An exponential moving average of a model's weights, the model the trainer serves.

Each optimizer step moves the trained model by a noisy amount; the sparse tasks (approval,
activation: 1% positives) are the noisiest, and their mean predicted rate moved by factors of 3
to 14 between versions a few seconds apart. Serving the average of the recent weights (Polyak
averaging) keeps what the steps agree on and cancels what they do not. The average is taken over
*trained rows*, not steps or seconds, so it means the same at any batch size or replay speed:
after ``half_life`` rows an old iterate weighs half. Until ``half_life`` rows have been seen it is
the plain mean of every iterate so far, so a cold start is not dragged towards the random init.

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
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """A frozen copy of ``model`` whose parameters follow the model's, averaged over trained rows."""

    def __init__(self, model: nn.Module, half_life: float) -> None:
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0 rows, got {half_life}")
        self.half_life = half_life
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.rows = 0  # rows averaged so far
        self._mine: list[torch.Tensor] = list(self.model.parameters())  # (walking the modules costs more
        self._theirs: tuple[nn.Module, list[torch.Tensor]] | None = None  # than the update itself)

    @torch.no_grad()
    def update(self, model: nn.Module, rows: int) -> None:
        """Fold in ``model`` as it is after a step on ``rows`` rows."""
        if rows <= 0:
            return
        keep = min(0.5 ** (rows / self.half_life), self.rows / (self.rows + rows))
        if self._theirs is None or self._theirs[0] is not model:
            self._theirs = (model, [p.detach() for p in model.parameters()])
        torch._foreach_lerp_(self._mine, self._theirs[1], 1.0 - keep)
        for b_avg, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_avg.copy_(b)
        self.rows += rows

    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}, "rows": self.rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.rows = int(state["rows"])
