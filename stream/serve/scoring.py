"""The scoring: a model version as the scorer serves it (funnel-ordered probabilities) and each
bank's objective and weight - the code behind the ``scores`` topic and ``POST /score`` alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import torch

from aitm.checkpoint import config_from_dict
from aitm.embedding_table import Encoder, encoder_from_state
from aitm.model import AITM
from aitm.projection import funnel_order
from stream.contract.events import TASKS
from stream.ops.settings import Settings

OBJECTIVES: Final = ("approval", "activation")


@dataclass(frozen=True)
class ScoringModel:
    """An immutable model version ready to score (eval mode, encoder never updated)."""

    version: int
    model: AITM
    encoder: Encoder
    created_at_ms: int

    @classmethod
    def from_checkpoint(cls, version: int, ckpt: Mapping[str, Any], created_at_ms: int = 0) -> ScoringModel:
        model = AITM(config_from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["model_state"])
        model.eval()
        return cls(version, model, encoder_from_state(ckpt["feature_maps"]), created_at_ms)

    @torch.inference_mode()
    def predict(self, rows: Sequence[Mapping[str, str]]) -> np.ndarray:
        """End-to-end probabilities (N, T) of feature dicts, in funnel order (``funnel_order``):
        what the scores topic and ``POST /score`` publish."""
        ids = torch.from_numpy(self.encoder.encode_dicts(rows))  # (N, F)
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
