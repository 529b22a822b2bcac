"""The record on the ``model-versions`` topic: one announced model version, and its JSON codec.

The trainer announces each version it publishes (after the file is written and verified); every
scorer follows the topic and loads the newest version it can verify.

``path``/``sha256`` name the file a scorer loads for the version, and ``artifact`` says what it
is: ``delta`` (``vN.delta.srv``: the rows changed since version N-1, applied to a replica in step),
``full`` (``vN.full.srv``: a whole serving snapshot, a trainer's first version after a start) or
``checkpoint`` (``vN.ckpt``, a training checkpoint: versions of encoders without a dynamic table,
and every announcement written before the field existed - a reader of an old record gets
``checkpoint``, so the field's addition is backward compatible both ways: old readers ignore it).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Final

from stream.contract.events import (
    INVALID_FIELD,
    MALFORMED_JSON,
    MISSING_FIELD,
    UNSUPPORTED_SCHEMA,
    InvalidRecord,
    loads_strict,
)

VERSION_SCHEMA: Final = 1
ARTIFACTS: Final = ("delta", "full", "checkpoint")  # what ``path`` is


class InvalidVersion(InvalidRecord):
    """A ``model-versions`` record that breaks the announcement contract."""


@dataclass(frozen=True)
class ModelVersion:
    """One announced model version."""

    version: int
    path: str
    sha256: str
    trained_samples: int
    created_at_ms: int
    max_sample_consumed_at_ms: int
    min_new_sample_consumed_at_ms: int
    artifact: str = "checkpoint"  # absent in older announcements: they named the checkpoint


def encode_version(v: ModelVersion) -> bytes:
    return json.dumps({"schema_version": VERSION_SCHEMA, **asdict(v)}, separators=(",", ":")).encode()


def parse_version(raw: bytes | str) -> ModelVersion:
    """Validate an announcement; raises ``InvalidVersion`` saying what is wrong."""
    obj = loads_strict(raw, "model version", InvalidVersion)
    if not isinstance(obj, dict):
        raise InvalidVersion(MALFORMED_JSON, "a model version announcement must be a JSON object")
    if obj.get("schema_version") != VERSION_SCHEMA:
        raise InvalidVersion(UNSUPPORTED_SCHEMA, f"model version schema_version {obj.get('schema_version')!r:.20}; this reader knows 1")
    ints = ("version", "trained_samples", "created_at_ms", "max_sample_consumed_at_ms", "min_new_sample_consumed_at_ms")
    for name in (*ints, "path", "sha256"):
        if name not in obj:
            raise InvalidVersion(MISSING_FIELD, f"model version field {name!r} is missing")
    for name in ints:
        if type(obj[name]) is not int or obj[name] < 0:
            raise InvalidVersion(INVALID_FIELD, f"model version field {name!r} must be a non-negative integer")
    if not isinstance(obj["path"], str) or not obj["path"]:
        raise InvalidVersion(INVALID_FIELD, "model version 'path' must be a non-empty string")
    sha = obj["sha256"]
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise InvalidVersion(INVALID_FIELD, "model version 'sha256' must be 64 lower-case hex digits")
    artifact = obj.get("artifact", "checkpoint")
    if artifact not in ARTIFACTS:
        raise InvalidVersion(INVALID_FIELD, f"model version 'artifact' must be one of {', '.join(ARTIFACTS)}")
    return ModelVersion(**{k: obj[k] for k in (*ints, "path", "sha256")}, artifact=artifact)
