"""deploy/schemas/: one JSON Schema per topic, generated from stream/contract/, current in the repository,
naming exactly the fields each encoder writes, and met by the records the pipeline's code produces (the
join on a simulated stream with faults, the scorer, the model store's announcement)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
from prometheus_client import CollectorRegistry

from simulators.funnel import EPOCH_MS
from stream.contract import schemas
from stream.contract.events import (
    STEP_INDEX,
    STEPS,
    Event,
    InvalidEvent,
    dead_letter,
    encode_event,
    parse_event,
)
from stream.contract.samples import Sample, encode_sample
from stream.contract.versions import ModelVersion, encode_version
from stream.join.funnel import FunnelConfig
from stream.ops.settings import Settings
from stream.serve.scorer import Scorer
from tests.joinhelpers import JoinDriver, small_stream
from tests.unit.test_scorer_http import known_model

REPO = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO / "deploy" / "schemas"
TOPIC_FILE = {**{t: f"{t}.schema.json" for t in schemas.EVENT_TOPICS.values()},
              "samples": "samples.schema.json", "scores": "scores.schema.json",
              "dead-letters": "dead-letters.schema.json", "model-versions": "model-versions.schema.json"}


@functools.cache
def validator(topic: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMA_DIR / TOPIC_FILE[topic]).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_the_checked_in_schemas_are_the_generated_ones() -> None:
    generated = schemas.all_schemas()
    assert sorted(generated) == sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(TOPIC_FILE.values())
    for name, schema in generated.items():
        assert (SCHEMA_DIR / name).read_text() == schemas.render(schema), f"{name}: run `aitm-stream schemas`"
    assert schemas.main(["--check", "--out", str(SCHEMA_DIR)]) == 0


def test_the_check_fails_on_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert schemas.main(["--out", str(tmp_path)]) == 0
    (tmp_path / "scores.schema.json").write_text("{}")
    assert schemas.main(["--check", "--out", str(tmp_path)]) == 1
    assert "scores.schema.json" in capsys.readouterr().err


def test_each_schema_names_exactly_the_fields_its_encoder_writes() -> None:
    imp = Event(0, "e1", "i1", 5, "bank_1", {"city": "3"})
    click = Event(1, "e2", "i1", 6, "bank_1")
    sample = Sample("i1", "bank_1", 5, {"city": "3"}, (1, 0, 0, 0), (True, False, False, False), "first", 10, 0)
    version = ModelVersion(3, "/m/v00000003.ckpt", "a" * 64, 10, 1, 2, 3)
    dead = dead_letter(b"\xff", source_topic="clicks", reason="malformed_json", detail="bad", partition=1,
                       offset=2, key=b"k", time_ms=9)
    records = {"impressions": encode_event(imp), "clicks": encode_event(click), "samples": encode_sample(sample),
               "model-versions": encode_version(version), "dead-letters": dead}
    for topic, raw in records.items():
        obj = json.loads(raw)
        validator(topic).validate(obj)
        assert set(obj) == set(validator(topic).schema["properties"]), topic


def test_records_the_pipeline_code_produced_meet_their_schemas(tmp_path: Path) -> None:
    """The join of a simulated stream with every kind of fault (samples and dead letters as the
    joiner emits them), the scorer's records of its impressions, and events as delivered."""
    raw_out: list[tuple[str, bytes]] = []

    class Recording(JoinDriver):
        def _collect(self, out: list) -> None:
            raw_out.extend((o.topic, o.value) for o in out)
            super()._collect(out)

    stream = small_stream(seed=5, per_day=600, days=2, tail_days=16)
    d = Recording(FunnelConfig(), start_ms=EPOCH_MS, partitions=2)
    records = list(stream)
    for rec in records:
        d.feed(STEP_INDEX[rec.step], rec.key, rec.value, rec.deliver_ms)
    d.idle(120_000)
    by_topic: dict[str, list[Any]] = {}
    for topic, value in raw_out:
        by_topic.setdefault(topic, []).append(json.loads(value))
    kinds = {s["kind"] for s in by_topic["samples"]}
    reasons = {x["reason"] for x in by_topic["dead-letters"]}
    assert kinds == {"first", "correction", "final"} and {"late", "malformed_json", "illegal_sequence"} <= reasons
    scorer = Scorer(Settings(data_dir=tmp_path), CollectorRegistry())
    impressions = [SimpleNamespace(value=r.value, key=r.key, topic="impressions", partition=0, offset=i)
                   for i, r in enumerate(records) if r.step == "impression"]
    scores, _ = scorer.score_batch(known_model(), impressions)
    by_topic["scores"] = [json.loads(v) for _, v in scores]
    for topic, objs in by_topic.items():
        v = validator(topic)
        for obj in objs:
            v.validate(obj)
    assert len(by_topic["scores"]) > 1000 and len(by_topic["samples"]) > 1000


def test_an_event_meets_its_schema_exactly_when_the_parser_accepts_it() -> None:
    """Every delivered event record of a faulty stream (JSON-readable ones: broken JSON is the
    parser's alone): the schema of its topic agrees with ``parse_event`` on accept / refuse."""
    stream = small_stream(seed=6, per_day=3000, days=1, tail_days=0)
    agree = refused = 0
    for rec in stream:
        topic = schemas.EVENT_TOPICS[rec.step]
        try:
            obj = json.loads(rec.value)
        except ValueError:
            continue
        try:
            parse_event(rec.value, expected_type=rec.step)
            accepted = True
        except InvalidEvent as exc:
            accepted = False
            refused += 1
            reason = exc.reason
        ok = validator(topic).is_valid(obj)
        assert ok == accepted, (topic, rec.value, None if accepted else reason)
        agree += 1
    assert agree > 3000 and refused > 5, (agree, refused)
    assert set(STEPS) == set(schemas.EVENT_TOPICS)


IMPRESSION = {"schema_version": 1, "event_type": "impression", "event_id": "e1", "impression_id": "i1",
              "event_time_ms": 1_767_225_600_000, "bank_id": "bank_1", "features": {"city": "3", "hour": "0"}}


@pytest.mark.parametrize(
    "change",
    [
        *({"drop": k} for k in IMPRESSION),
        {"schema_version": 2}, {"schema_version": "1"}, {"event_type": "click"}, {"event_type": "view"},
        {"event_id": ""}, {"event_id": 7}, {"impression_id": "i" * 129}, {"bank_id": None},
        {"event_time_ms": -1}, {"event_time_ms": 2**53}, {"event_time_ms": 1.5}, {"event_time_ms": "5"},
        {"features": []}, {"features": {"city": 3}}, {"features": {"": "x"}}, {"features": {"c": "x" * 257}},
        {"features": {f"f{i}": "x" for i in range(257)}},
    ],
)
def test_a_broken_impression_is_refused_by_schema_and_parser_alike(change: dict[str, Any]) -> None:
    obj = {k: v for k, v in IMPRESSION.items() if k != change.get("drop")}
    obj.update({k: v for k, v in change.items() if k != "drop"})
    with pytest.raises(InvalidEvent):
        parse_event(json.dumps(obj).encode(), expected_type="impression")
    assert not validator("impressions").is_valid(obj)
    assert validator("impressions").is_valid(IMPRESSION)
    parse_event(json.dumps(IMPRESSION).encode(), expected_type="impression")
