"""The event parser: every field missing or wrong gives one clear error with a reason code."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stream.contract.events import (
    INVALID_FIELD,
    MALFORMED_JSON,
    MISSING_FIELD,
    UNSUPPORTED_SCHEMA,
    WRONG_TOPIC,
    Event,
    InvalidEvent,
    dead_letter,
    encode_event,
    parse_event,
    parse_events,
)

CLICK: dict[str, Any] = {
    "schema_version": 1,
    "event_type": "click",
    "event_id": "i-1/click",
    "impression_id": "i-1",
    "event_time_ms": 1_767_225_600_000,
    "bank_id": "bank_2",
}
IMPRESSION: dict[str, Any] = {
    **CLICK,
    "event_type": "impression",
    "event_id": "i-1/impression",
    "features": {"hour": "3"},
}


def raw(d: Any) -> bytes:
    return json.dumps(d).encode()


def test_round_trip_of_every_step() -> None:
    for step, name in enumerate(("impression", "click", "application", "approval", "activation")):
        ev = Event(step, f"e{step}", "i-1", 5 + step, "b", {"f": "1"} if step == 0 else None)
        back = parse_event(encode_event(ev), name)
        assert back == ev
        assert back.event_type == name


@pytest.mark.parametrize("field", sorted(CLICK))
def test_every_missing_field_is_named(field: str) -> None:
    d = {k: v for k, v in CLICK.items() if k != field}
    with pytest.raises(InvalidEvent) as err:
        parse_event(raw(d))
    assert err.value.reason == MISSING_FIELD
    assert field in str(err.value)


def test_impression_without_features() -> None:
    d = {k: v for k, v in IMPRESSION.items() if k != "features"}
    with pytest.raises(InvalidEvent, match="features") as err:
        parse_event(raw(d))
    assert err.value.reason == MISSING_FIELD


BAD_VALUES = [
    ("event_type", "purchase", INVALID_FIELD, "event_type"),
    ("event_type", 3, INVALID_FIELD, "event_type"),
    ("event_id", "", INVALID_FIELD, "event_id"),
    ("event_id", 17, INVALID_FIELD, "event_id"),
    ("event_id", "x" * 129, INVALID_FIELD, "event_id"),
    ("impression_id", None, INVALID_FIELD, "impression_id"),
    ("impression_id", "a\x00b", INVALID_FIELD, "impression_id"),
    ("bank_id", ["b"], INVALID_FIELD, "bank_id"),
    ("event_time_ms", "yesterday", INVALID_FIELD, "event_time_ms"),
    ("event_time_ms", -1, INVALID_FIELD, "event_time_ms"),
    ("event_time_ms", 2**60, INVALID_FIELD, "event_time_ms"),
    ("event_time_ms", 1.5, INVALID_FIELD, "event_time_ms"),
    ("event_time_ms", True, INVALID_FIELD, "event_time_ms"),
    ("schema_version", 2, UNSUPPORTED_SCHEMA, "schema_version"),
    ("schema_version", "1", UNSUPPORTED_SCHEMA, "schema_version"),
]


@pytest.mark.parametrize(("field", "value", "reason", "mentions"), BAD_VALUES)
def test_every_wrong_value_is_explained(field: str, value: Any, reason: str, mentions: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(raw({**CLICK, field: value}))
    assert err.value.reason == reason
    assert mentions in str(err.value)


@pytest.mark.parametrize(
    "features",
    [
        ["hour", "3"],
        {"hour": 3},
        {"hour": None},
        {"": "1"},
        {"hour": "x" * 300},
        {f"f{i}": "1" for i in range(300)},
    ],
)
def test_bad_feature_maps(features: Any) -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(raw({**IMPRESSION, "features": features}))
    assert err.value.reason == INVALID_FIELD


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{",
        b"[]",
        b"42",
        b"\xff\xfe{}",
        b'{"schema_version": NaN}',
        b'{"a": 1, "a": 2}',
        b"[" * 100_000,
        b" " * 70_000,
    ],
)
def test_malformed_bytes(payload: bytes) -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(payload)
    assert err.value.reason == MALFORMED_JSON


def test_event_on_the_wrong_topic() -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(raw(CLICK), expected_type="approval")
    assert err.value.reason == WRONG_TOPIC


def test_whole_float_timestamp_is_accepted() -> None:
    assert parse_event(raw({**CLICK, "event_time_ms": 5.0})).event_time_ms == 5


def test_dead_letter_keeps_raw_bytes_and_reason() -> None:
    rec = json.loads(
        dead_letter(b"\xff{", source_topic="clicks", reason=MALFORMED_JSON, detail="bad", offset=3)
    )
    assert rec["reason"] == MALFORMED_JSON
    assert rec["raw_encoding"] == "base64"
    assert rec["source_topic"] == "clicks" and rec["offset"] == 3
    text = json.loads(dead_letter(b"{oops", source_topic="clicks", reason=MALFORMED_JSON, detail="bad"))
    assert text["raw"] == "{oops" and text["raw_encoding"] == "utf-8"


COMPACT_IMPRESSION = (
    b'{"schema_version":1,"event_type":"impression","event_id":"i-1/impression","impression_id":"i-1",'
    b'"event_time_ms":1767225600000,"bank_id":"bank_2","features":{"hour":"3","slot":"1"}}'
)


@pytest.mark.parametrize(
    "payload",
    [
        # compact records take the fast path (value at offset 0 filling the text)
        COMPACT_IMPRESSION.replace(b'"bank_id":"bank_2"', b'"bank_id":"bank_2","bank_id":"bank_3"'),
        COMPACT_IMPRESSION.replace(b'"slot":"1"', b'"slot":"1","hour":"4"'),  # in the features object
        COMPACT_IMPRESSION.replace(b'"slot":"1"', b'"slot":"1","slot":"1"'),  # even with equal values
        COMPACT_IMPRESSION.replace(b'"slot":"1"', b'"slot":{"a":1,"a":2}'),  # deeper down
        # leading / trailing whitespace takes the full decoder: still refused
        b"  " + COMPACT_IMPRESSION.replace(b'"slot":"1"', b'"slot":"1","hour":"4"'),
        COMPACT_IMPRESSION.replace(b'"slot":"1"', b'"slot":"1","hour":"4"') + b"\n",
    ],
)
def test_duplicate_keys_are_refused_on_every_path(payload: bytes) -> None:
    with pytest.raises(InvalidEvent, match="duplicate key") as err:
        parse_event(payload)
    assert err.value.reason == MALFORMED_JSON


@pytest.mark.parametrize("payload", [b"  " + COMPACT_IMPRESSION, COMPACT_IMPRESSION + b" \n", COMPACT_IMPRESSION])
def test_surrounding_whitespace_is_accepted(payload: bytes) -> None:
    assert parse_event(payload).features == {"hour": "3", "slot": "1"}


@pytest.mark.parametrize("tail", [b"x", b" {}", b"}", b"\x00"])
def test_extra_data_after_the_object_is_refused(tail: bytes) -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(COMPACT_IMPRESSION + tail)
    assert err.value.reason == MALFORMED_JSON


def test_a_batchs_invalid_events_leave_no_garbage_for_the_cycle_collector() -> None:
    """The ``InvalidEvent``s ``parse_events`` hands back are detached from the exceptions' tracebacks
    and chains: a traceback holds the frames that caught it, whose locals hold the batch and the
    error itself - a reference cycle that kept each such batch (the joiner's whole ``on_batch``
    frame) alive until a collection, and made those collections traverse it (issue 16, round 21)."""
    import gc

    good = b'{"schema_version":1,"event_type":"click","event_id":"e","impression_id":"i","event_time_ms":5,"bank_id":"b"}'
    raws = [good, b'{"a":1,"a":2}', None, b"\xff\xfe", b"[1,", good.replace(b'"b"}', b'"b",') + b"}", b"1"]
    gc.collect()
    gc.disable()
    try:
        events = parse_events(raws, ["click"] * len(raws))
        assert sum(isinstance(e, InvalidEvent) for e in events) == 6
        assert all(e.__traceback__ is None and e.__context__ is None for e in events if isinstance(e, InvalidEvent))
        del events
        assert gc.collect() == 0  # nothing left that only the cycle collector could free
    finally:
        gc.enable()
