"""JSON Schema (draft 2020-12) of every topic's record, built from the contract modules.

The limits, names and enumerations come from the modules that define and parse each record
(``events``, ``samples``, ``versions``, ``scores``), so a change there changes the schema;
``tests/unit/test_schemas.py`` checks that the files in ``deploy/schemas/`` are what this module
generates, that each schema names exactly the fields its encoder writes, and that records the
pipeline produced validate. ``aitm-stream schemas`` rewrites the files, ``--check`` only compares.

What JSON Schema cannot say is left to the parsers (and said in each ``description``): ids must be
printable, a ``samples`` record's labels are monotone, and duplicate JSON keys, NaN and records
over 64 KiB are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Final

from stream.contract.events import (
    MAX_EVENT_TIME_MS,
    MAX_FEATURE_LEN,
    MAX_FEATURES,
    MAX_ID_LEN,
    MAX_RECORD_BYTES,
    PARSE_REASONS,
    SCHEMA_VERSION,
    STEPS,
    TASKS,
)
from stream.contract.samples import KINDS, SAMPLE_SCHEMA_VERSION
from stream.contract.scores import OBJECTIVES, SCORE_FIELDS, SCORE_SCHEMA_VERSION
from stream.contract.versions import ARTIFACTS, VERSION_SCHEMA, ModelVersion

DRAFT: Final = "https://json-schema.org/draft/2020-12/schema"
BASE_ID: Final = "https://aitm-stream.example/schemas/"
DEFAULT_DIR: Final = Path("deploy/schemas")
# the topics' default names (TOPIC_* settings may rename them; the records stay the same)
EVENT_TOPICS: Final = {"impression": "impressions", "click": "clicks", "application": "applications",
                       "approval": "approvals", "activation": "activations"}
# dead-letter reasons beyond the parse codes: the joiner's and the trainer's
JOIN_REASONS: Final = ("late", "illegal_sequence", "future")

_ID: Final[dict[str, Any]] = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN,
              "description": f"non-empty, printable, at most {MAX_ID_LEN} characters"}
_EPOCH_MS: Final = {"type": "integer", "minimum": 0, "maximum": MAX_EVENT_TIME_MS - 1,
                    "description": "epoch milliseconds"}
_COUNT: Final = {"type": "integer", "minimum": 0}
_PROB: Final = {"type": "number", "minimum": 0, "maximum": 1}
_FEATURES: Final = {
    "type": "object",
    "description": "categorical field name -> value, both strings",
    "maxProperties": MAX_FEATURES,
    "propertyNames": {"minLength": 1, "maxLength": MAX_FEATURE_LEN},
    "additionalProperties": {"type": "string", "maxLength": MAX_FEATURE_LEN},
}


def _schema(name: str, title: str, description: str, properties: dict[str, Any], required: list[str],
            additional: bool = True) -> dict[str, Any]:
    return {
        "$schema": DRAFT,
        "$id": f"{BASE_ID}{name}.schema.json",
        "title": title,
        "description": description,
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": additional,
    }


def event_schema(step: str) -> dict[str, Any]:
    """A funnel event (``stream.contract.events``): what ``parse_event`` accepts on its topic."""
    props: dict[str, Any] = {
        "schema_version": {"const": SCHEMA_VERSION},
        "event_type": {"const": step},
        "event_id": {**_ID, "description": "unique per event: the dedupe key; " + _ID["description"]},
        "impression_id": {**_ID, "description": "the record key: one impression's events share a partition"},
        "event_time_ms": {**_EPOCH_MS, "description": "when it happened (event time), epoch milliseconds"},
        "bank_id": _ID,
    }
    required = list(props)
    if step == STEPS[0]:
        props["features"] = _FEATURES
        required.append("features")
    return _schema(
        EVENT_TOPICS[step], f"{step} event",
        f"A record on the {EVENT_TOPICS[step]} topic (key: impression_id; at most {MAX_RECORD_BYTES} bytes "
        "of UTF-8 JSON, no duplicate keys, no NaN). Other fields are ignored.",
        props, required)


def sample_schema() -> dict[str, Any]:
    """A training sample (``stream.contract.samples``): labels and masks per task in funnel order."""
    four = {"minItems": len(TASKS), "maxItems": len(TASKS)}
    props = {
        "schema_version": {"const": SAMPLE_SCHEMA_VERSION},
        "impression_id": _ID,
        "bank_id": _ID,
        "event_time_ms": {**_EPOCH_MS, "description": "the impression's event time"},
        "features": _FEATURES,
        "labels": {"type": "array", "items": {"enum": [0, 1]}, **four,
                   "description": f"per task {list(TASKS)}: 0/1, monotone along the funnel"},
        "mature": {"type": "array", "items": {"type": "boolean"}, **four,
                   "description": "per task: the label is settled (positive, or its window closed)"},
        "kind": {"enum": list(KINDS)},
        "elapsed_ms": {**_COUNT, "description": "event time from the impression to what the sample reflects"},
        "seq": {"type": "integer", "minimum": 0, "maximum": 5,
                "description": "0 first, 1-4 correction by step, 5 final: dedupe on (impression_id, seq)"},
        "watermark_ms": {"type": "integer", "description": "the partition's watermark at emission"},
        "policy": {"enum": ["early", "matured"]},
    }
    return _schema("samples", "training sample", "A record on the samples topic (key: impression_id).",
                   props, [n for n in props if n not in ("watermark_ms", "policy")])


def score_schema() -> dict[str, Any]:
    """A score (``stream.contract.scores``)."""
    props: dict[str, Any] = {
        "schema_version": {"const": SCORE_SCHEMA_VERSION},
        "impression_id": _ID,
        "bank_id": _ID,
        "model_version": {**_COUNT, "description": "the model version that scored it"},
        "probabilities": {"type": "object", "properties": {t: _PROB for t in TASKS}, "required": list(TASKS),
                          "additionalProperties": False,
                          "description": "end-to-end probability per task, non-increasing along the funnel"},
        "objective": {"enum": list(OBJECTIVES)},
        "weight": {"type": "number", "minimum": 0},
        "score": {"type": "number", "minimum": 0, "description": "weight x probabilities[objective]"},
        "event_time_ms": _EPOCH_MS,
        "scored_at_ms": {**_EPOCH_MS, "description": "the scorer's wall clock"},
    }
    if tuple(props) != SCORE_FIELDS:
        raise RuntimeError("stream.contract.scores.SCORE_FIELDS changed: describe the new fields here")
    return _schema("scores", "score", "A record on the scores topic (key: impression_id).", props,
                   list(props), additional=False)


def version_schema() -> dict[str, Any]:
    """A model version announcement (``stream.contract.versions``)."""
    special: dict[str, Any] = {
        "path": {"type": "string", "minLength": 1, "description": "the version's file in the model store"},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "sha256 of the whole file"},
        "artifact": {"enum": list(ARTIFACTS), "description": "what path is: a serving delta or full snapshot, or "
                     "a training checkpoint (absent in older records: checkpoint)"},
    }
    props: dict[str, Any] = {"schema_version": {"const": VERSION_SCHEMA}}
    for f in dataclasses.fields(ModelVersion):
        props[f.name] = special.get(f.name) or ({**_COUNT} if f.type in (int, "int") else {"type": "string"})
    required = [name for name in props if name != "artifact"]  # optional: older announcements lack it
    return _schema("model-versions", "model version announcement",
                   "A record on the model-versions topic: a published model version.", props, required)


def dead_letter_schema() -> dict[str, Any]:
    """A dead letter (``stream.contract.events.dead_letter``)."""
    nullable_int = {"type": ["integer", "null"], "minimum": 0}
    props = {
        "schema_version": {"const": SCHEMA_VERSION},
        "source_topic": {"type": "string", "minLength": 1},
        "partition": nullable_int,
        "offset": nullable_int,
        "key": {"type": ["string", "null"]},
        "reason": {"type": "string", "minLength": 1,
                   "description": "a short code: " + ", ".join((*PARSE_REASONS, *JOIN_REASONS)) + ", ..."},
        "detail": {"type": "string", "description": "what is wrong, in a sentence"},
        "raw": {"type": ["string", "null"], "description": "the refused record's value"},
        "raw_encoding": {"enum": ["utf-8", "base64"]},
        "time_ms": {"type": ["integer", "null"], "description": "when it was refused, epoch milliseconds"},
    }
    return _schema("dead-letters", "dead letter", "A record on the dead-letters topic: a refused record and why.",
                   props, list(props), additional=False)


def all_schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema, one per topic."""
    schemas = [event_schema(step) for step in STEPS]
    schemas += [sample_schema(), score_schema(), version_schema(), dead_letter_schema()]
    return {s["$id"].rsplit("/", 1)[-1]: s for s in schemas}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write every topic's schema to ``--out`` (default deploy/schemas), or ``--check`` them."""
    p = argparse.ArgumentParser(prog="aitm-stream schemas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help="directory (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if a file differs")
    args = p.parse_args(argv)
    stale = []
    for name, schema in all_schemas().items():
        path = args.out / name
        text = render(schema)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run `aitm-stream schemas`", file=sys.stderr)
        return 1
    print(f"{'checked' if args.check else 'wrote'} {len(all_schemas())} schemas in {args.out}")
    return 0
