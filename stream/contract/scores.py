"""The score record on the ``scores`` topic (key = impression id), ``schema_version`` 1.

One per scored impression: the model version's end-to-end probability of every task (funnel
order), the bank's objective and weight, and ``score = weight x probabilities[objective]`` (the
paper's Eq. 1)::

    {"schema_version": 1, "impression_id": "i-42", "bank_id": "bank_2", "model_version": 7,
     "probabilities": {"click": 0.21, "application": 0.02, "approval": 0.013, "activation": 0.009},
     "objective": "approval", "weight": 1.0, "score": 0.013,
     "event_time_ms": 1767225600000, "scored_at_ms": 1767225600123}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

SCORE_SCHEMA_VERSION: Final = 1
OBJECTIVES: Final = ("approval", "activation")
# the record's fields in the order written
SCORE_FIELDS: Final = (
    "schema_version", "impression_id", "bank_id", "model_version", "probabilities", "objective", "weight",
    "score", "event_time_ms", "scored_at_ms",
)  # fmt: skip


def score_record(
    impression_id: str, bank_id: str, scored: Mapping[str, Any], event_time_ms: int, scored_at_ms: int
) -> dict[str, Any]:
    """The record of one impression; ``scored`` holds ``model_version``, ``probabilities``,
    ``objective``, ``weight`` and ``score`` (``stream.serve.scoring.score_fields``)."""
    return {
        "schema_version": SCORE_SCHEMA_VERSION,
        "impression_id": impression_id,
        "bank_id": bank_id,
        "model_version": scored["model_version"],
        "probabilities": scored["probabilities"],
        "objective": scored["objective"],
        "weight": scored["weight"],
        "score": scored["score"],
        "event_time_ms": event_time_ms,
        "scored_at_ms": scored_at_ms,
    }


def encode_score(record: Mapping[str, Any]) -> bytes:
    """The record value (compact JSON, UTF-8)."""
    return json.dumps(record, separators=(",", ":")).encode()
