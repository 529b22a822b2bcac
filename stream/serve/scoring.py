"""The scoring: a model version as the scorer serves it (funnel-ordered probabilities) and each
bank's objective and weight - the code behind the ``scores`` topic and ``POST /score`` alike."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from aitm.checkpoint import config_from_dict
from aitm.embedding_table import Encoder, encoder_from_state
from aitm.model import AITM
from aitm.projection import funnel_order
from stream.contract.events import TASKS
from stream.ops.settings import Settings

OBJECTIVES: Final = ("approval", "activation")
log = logging.getLogger(__name__)


class ServedModel(nn.Module):
    """The model as served, in torch: ids (N, F) -> ``funnel_order(sigmoid(logits))`` (N, T)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.model(ids))  # (N, T)
        steps = [p[:, 0]]
        for t in range(1, p.shape[1]):  # the cumulative minimum along the funnel (aitm/projection.py)
            steps.append(torch.minimum(steps[-1], p[:, t]))
        return torch.stack(steps, dim=1)  # (N, T)


def traced(model: nn.Module, n_fields: int) -> torch.jit.ScriptModule | None:
    """``ServedModel(model)`` traced and frozen by TorchScript, or None if that fails or its output
    differs from the eager model's. Measured (AITM, paper sizes, 1 thread): batch 1 0.40 -> 0.14 ms,
    the same bits out; but tracing a version costs 0.3 s of CPU on a quiet core (1.3-2 s at load
    20), against a version every 3 s: opt-in (``SCORER_TORCHSCRIPT``) for HTTP-heavy scorers."""
    served = ServedModel(model).eval()
    example = torch.zeros((8, n_fields), dtype=torch.int64)  # (8, F)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
            module = torch.jit.freeze(torch.jit.trace(served, example).eval())
            check = torch.randint(0, 2, (5, n_fields), dtype=torch.int64)  # (5, F): another batch size
            for _ in range(3):  # the profiling executor's first runs, here rather than on a request
                same = torch.equal(module(check), served(check))
    except Exception as exc:  # tracing is an optimisation: serve the eager model if it fails
        log.warning("serving the eager model (TorchScript tracing failed: %s)", exc)
        return None
    if not same:
        log.warning("serving the eager model (the traced one differs)")
        return None
    return module


@dataclass(frozen=True)
class ScoringModel:
    """An immutable model version ready to score (eval mode, encoder never updated); ``fast`` is
    the same model traced (``traced``, opt-in), used when present."""

    version: int
    model: AITM
    encoder: Encoder
    created_at_ms: int
    fast: torch.jit.ScriptModule | None = field(default=None, compare=False, repr=False)
    # held while scoring when the model is a replica that deltas change in place (stream.serve.replica)
    lock: threading.Lock | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_checkpoint(
        cls, version: int, ckpt: Mapping[str, Any], created_at_ms: int = 0, trace: bool = False
    ) -> ScoringModel:
        """The version of a checkpoint; ``trace``: also build the traced copy (``SCORER_TORCHSCRIPT``)."""
        model = AITM(config_from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["model_state"])
        model.eval()
        encoder = encoder_from_state(ckpt["feature_maps"])
        fast = traced(model, len(encoder.fields)) if trace else None
        return cls(version, model, encoder, created_at_ms, fast)

    @torch.inference_mode()
    def predict(self, rows: Sequence[Mapping[str, str]]) -> np.ndarray:
        """End-to-end probabilities (N, T) of feature dicts, in funnel order (``funnel_order``):
        what the scores topic and ``POST /score`` publish."""
        with self.lock if self.lock is not None else nullcontext():
            ids = torch.from_numpy(self.encoder.encode_dicts(rows))  # (N, F)
            if self.fast is not None:
                out: np.ndarray = self.fast(ids).numpy()
                return out
            return funnel_order(torch.sigmoid(self.model(ids)).numpy())


@dataclass(frozen=True)
class BankPolicy:
    """Eq. 1 of the paper: each bank's objective (approval or activation) and its weight."""

    default_objective: str = "approval"
    objectives: Mapping[str, str] = field(default_factory=dict)
    default_weight: float = 1.0
    weights: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, s: Settings) -> BankPolicy:
        return cls(
            s.scorer_default_objective,
            dict(s.scorer_bank_objectives),
            s.scorer_default_weight,
            dict(s.scorer_bank_weights),
        )

    def score(self, bank_id: str, probs: np.ndarray) -> tuple[str, float, float]:
        """(objective, weight, weight x y_hat[objective]) for one row of probabilities (T,)."""
        objective = self.objectives.get(bank_id, self.default_objective)
        weight = float(self.weights.get(bank_id, self.default_weight))
        return objective, weight, weight * float(probs[TASKS.index(objective)])


def score_fields(m: ScoringModel, policy: BankPolicy, bank_id: str, probs: np.ndarray) -> dict[str, Any]:
    objective, weight, score = policy.score(bank_id, probs)
    return {
        "model_version": m.version,
        "probabilities": {t: round(float(p), 7) for t, p in zip(TASKS, probs, strict=True)},
        "objective": objective,
        "weight": weight,
        "score": score,
    }
