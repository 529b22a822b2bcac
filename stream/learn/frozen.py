"""The frozen baseline: a copy of the model taken once event time passes the stream's start +
``TRAINER_FREEZE_AFTER_DAYS``, which only scores (the finals of later impressions) and never
trains - what continuous training buys under drift, measured on the very same finals as the live
model (``paired``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from aitm.embedding_table import Encoder
from aitm.model import AITM
from stream.learn.prequential import PrequentialEvaluator
from stream.learn.sample_batch import N_TASKS


class FrozenBaseline:
    """The frozen copy, its evaluator, and the live model's evaluator on the same rows."""

    def __init__(self, model: AITM, encoder: Encoder, cutoff_ms: int, device: torch.device,
                 eval_window: int) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cutoff_ms = cutoff_ms  # impressions from here on are its evaluation set
        self.device = device
        # ids given after the freeze (admitted later, or a recycled row given to another value) are
        # out-of-vocabulary to the frozen model, whose vocabulary stopped here
        self.encoder = encoder
        self.marker: Any = encoder.marker()
        self.evaluator = PrequentialEvaluator(N_TASKS, eval_window)
        # the live model on the very same finals as the frozen copy: the like-for-like comparison
        self.paired = PrequentialEvaluator(N_TASKS, eval_window)

    def evaluate(self, event_time_ms: np.ndarray, ids: np.ndarray, final_rows: list[int],
                 y_eval: np.ndarray, p_eval: np.ndarray) -> None:
        """Score the finals (rows ``final_rows`` of a batch whose impressions' event times are
        ``event_time_ms`` and encoded features ``ids``) of impressions from the cutoff on. It never
        trains, so its prediction now is the one it made at the first sample (test-then-train);
        ``y_eval``/``p_eval`` are those finals' labels and the live model's predictions."""
        rows = np.asarray(final_rows)
        later = event_time_ms[rows] >= self.cutoff_ms
        if not later.any():
            return
        x = ids[rows[later]]  # (E, F)
        x = self.encoder.known_as_of(x, self.marker)
        with torch.inference_mode():
            p = torch.sigmoid(self.model(torch.as_tensor(x, device=self.device))).float().cpu().numpy()
        self.evaluator.update(y_eval[later], p.astype(np.float64))
        self.paired.update(y_eval[later], p_eval[later])

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "cutoff_ms": self.cutoff_ms,
            "marker": self.marker,
            "evaluator": self.evaluator.state_dict(),
            "paired_evaluator": self.paired.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.cutoff_ms = int(state["cutoff_ms"])
        self.marker = state["marker"] if "marker" in state else state.get("vocab_sizes")
        self.evaluator.load_state_dict(list(state["evaluator"]))
        if "paired_evaluator" in state:
            self.paired.load_state_dict(list(state["paired_evaluator"]))
