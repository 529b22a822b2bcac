"""The training sample record on the ``samples`` topic, and its JSON codec (``schema_version: 1``).

Labels and masks are per task in funnel order (click, application, approval, activation).
``seq`` orders one impression's samples (first 0, a correction uses the step it turned positive,
1..4, final 5): downstream deduplicates on ``(impression_id, seq)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from stream.contract.events import InvalidRecord, loads_strict

SAMPLE_SCHEMA_VERSION: Final = 1
KINDS: Final = ("first", "correction", "final")


class InvalidSample(InvalidRecord):
    """A ``samples`` record that breaks the sample contract."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One training sample: features, labels so far, and which labels are already final."""

    impression_id: str
    bank_id: str
    event_time_ms: int  # the impression's event time
    features: dict[str, str]
    labels: tuple[int, int, int, int]
    mature: tuple[bool, bool, bool, bool]
    kind: Literal["first", "correction", "final"]
    elapsed_ms: int  # event time from the impression to what this sample reflects
    seq: int
    watermark_ms: int = 0  # the partition watermark when it was emitted
    policy: str = "early"
    extra: dict[str, Any] = field(default_factory=dict)


def encode_sample(s: Sample) -> bytes:
    d: dict[str, Any] = {
        "schema_version": SAMPLE_SCHEMA_VERSION,
        "impression_id": s.impression_id,
        "bank_id": s.bank_id,
        "event_time_ms": s.event_time_ms,
        "features": s.features,
        "labels": list(s.labels),
        "mature": list(s.mature),
        "kind": s.kind,
        "elapsed_ms": s.elapsed_ms,
        "seq": s.seq,
        "watermark_ms": s.watermark_ms,
        "policy": s.policy,
    }
    return json.dumps(d, separators=(",", ":")).encode()


_json_str = json.encoder.encode_basestring_ascii  # C: quoted and escaped as json.dumps does
_BOOL = (b"false", b"true")
_SAMPLE_TEMPLATE: Final = (
    b'{"schema_version":%d,"impression_id":%b,"bank_id":%b,"event_time_ms":%d,"features":%b,'
    b'"labels":[%d,%d,%d,%d],"mature":[%b,%b,%b,%b],"kind":%b,"elapsed_ms":%d,"seq":%d,'
    b'"watermark_ms":%d,"policy":%b}'
)


def sample_bytes(
    impression_id: str,
    bank_id: str,
    event_time_ms: int,
    features_json: bytes,
    labels: tuple[int, int, int, int],
    mature: tuple[bool, bool, bool, bool],
    kind: str,
    elapsed_ms: int,
    seq: int,
    watermark_ms: int,
    policy: str,
) -> bytes:
    """``encode_sample`` byte for byte, with the features already encoded (the joiner's hot path).

    ``features_json`` must be the compact JSON of the feature map (``stream.join.funnel.features_json``).
    """
    return _SAMPLE_TEMPLATE % (
        SAMPLE_SCHEMA_VERSION, _json_str(impression_id).encode(), _json_str(bank_id).encode(), event_time_ms,
        features_json, labels[0], labels[1], labels[2], labels[3],
        _BOOL[mature[0]], _BOOL[mature[1]], _BOOL[mature[2]], _BOOL[mature[3]],
        _json_str(kind).encode(), elapsed_ms, seq, watermark_ms, _json_str(policy).encode(),
    )  # fmt: skip


def _four(obj: dict[str, Any], name: str, kind: type) -> tuple[Any, Any, Any, Any]:
    v = obj.get(name)
    if not isinstance(v, list) or len(v) != 4 or not all(type(x) is kind for x in v):
        raise InvalidSample("invalid_field", f"sample field {name!r} must be a list of 4 {kind.__name__}")
    return (v[0], v[1], v[2], v[3])


def validate_sample(raw: bytes | str) -> dict[str, Any]:
    """Check one ``samples`` record; its JSON object, or ``InvalidSample`` saying what is wrong."""
    obj = loads_strict(raw, "sample", InvalidSample)
    if not isinstance(obj, dict):
        raise InvalidSample("malformed_json", "a sample must be a JSON object")
    if obj.get("schema_version") != SAMPLE_SCHEMA_VERSION:
        raise InvalidSample("unsupported_schema", f"sample schema_version {obj.get('schema_version')!r:.20}; this reader knows 1")
    for name in ("impression_id", "bank_id", "event_time_ms", "features", "kind", "elapsed_ms", "seq"):
        if name not in obj:
            raise InvalidSample("missing_field", f"sample field {name!r} is missing")
    if obj["kind"] not in KINDS:
        raise InvalidSample("invalid_field", f"sample kind {obj['kind']!r:.20} is not one of {KINDS}")
    feats = obj["features"]
    if not isinstance(feats, dict) or not all(isinstance(v, str) for v in feats.values()):
        raise InvalidSample("invalid_field", "sample features must be an object of string -> string")
    for name in ("event_time_ms", "elapsed_ms", "seq"):
        if type(obj[name]) is not int:
            raise InvalidSample("invalid_field", f"sample field {name!r} must be an integer")
    if type(obj.get("watermark_ms", 0)) is not int:
        raise InvalidSample("invalid_field", "sample field 'watermark_ms' must be an integer")
    for name in ("impression_id", "bank_id", "policy"):
        if not isinstance(obj.get(name, ""), str):
            raise InvalidSample("invalid_field", f"sample field {name!r} must be a string")
    labels = _four(obj, "labels", int)
    if any(x not in (0, 1) for x in labels):
        raise InvalidSample("invalid_field", "sample labels must be 0 or 1")
    _four(obj, "mature", bool)
    obj.setdefault("watermark_ms", 0)  # optional fields, filled: every ``Sample`` field is a key
    obj.setdefault("policy", "early")
    return obj


def sample_from_valid(obj: dict[str, Any]) -> Sample:
    """The ``Sample`` of an object ``validate_sample`` accepted."""
    labels, mature = obj["labels"], obj["mature"]
    return Sample(
        impression_id=obj["impression_id"],
        bank_id=obj["bank_id"],
        event_time_ms=obj["event_time_ms"],
        features=obj["features"],
        labels=(labels[0], labels[1], labels[2], labels[3]),
        mature=(mature[0], mature[1], mature[2], mature[3]),
        kind=obj["kind"],
        elapsed_ms=obj["elapsed_ms"],
        seq=obj["seq"],
        watermark_ms=obj["watermark_ms"],
        policy=obj["policy"],
    )


def parse_sample(raw: bytes | str) -> Sample:
    """Validate one ``samples`` record into a ``Sample``; raises ``InvalidSample`` saying what is wrong."""
    return sample_from_valid(validate_sample(raw))
