"""Property-based fuzzing of the boundaries: any input parses or raises the one clear error type."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stream.contract.events import PARSE_REASONS, Event, InvalidEvent, encode_event, parse_event
from stream.contract.samples import InvalidSample, parse_sample
from stream.ops.settings import Settings

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=300),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=30,
)
FIELDS = ("schema_version", "event_type", "event_id", "impression_id", "event_time_ms", "bank_id", "features")
near_events = st.fixed_dictionaries(
    {},
    optional={
        "schema_version": st.one_of(st.just(1), json_scalars),
        "event_type": st.one_of(st.sampled_from(["impression", "click", "approval", "bogus"]), json_scalars),
        "event_id": st.one_of(st.text(min_size=1, max_size=140), json_scalars),
        "impression_id": st.one_of(st.text(min_size=1, max_size=140), json_scalars),
        "event_time_ms": st.one_of(st.integers(min_value=-5, max_value=2**60), json_scalars),
        "bank_id": st.one_of(st.text(min_size=1, max_size=10), json_scalars),
        "features": st.one_of(
            st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=5), json_values
        ),
    },
)


def _check(raw: bytes, expected_type: str | None = None) -> None:
    try:
        ev = parse_event(raw, expected_type)
    except InvalidEvent as exc:
        assert exc.reason in PARSE_REASONS
        assert str(exc)
        return
    assert isinstance(ev, Event)
    assert parse_event(encode_event(ev)) == ev  # whatever is accepted round-trips


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2_000))
def test_random_bytes(raw: bytes) -> None:
    _check(raw)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(near_events, st.sampled_from([None, "impression", "click"]))
def test_near_miss_events(obj: dict[str, Any], expected: str | None) -> None:
    _check(json.dumps(obj, allow_nan=True).encode(), expected)


@settings(max_examples=200)
@given(st.text(max_size=500))
def test_bad_unicode_and_text(text: str) -> None:
    _check(text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("depth", [10, 1_000, 50_000])
def test_deep_nesting(depth: int) -> None:
    _check(b'{"features":' + b"[" * depth + b"]" * depth + b"}")


def test_huge_values() -> None:
    big = json.dumps({"schema_version": 1, "event_type": "click", "event_id": "e" * 10_000_000}).encode()
    with pytest.raises(InvalidEvent):
        parse_event(big)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=500), json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.binary(max_size=300).map(lambda b: b"\x9c\x02" + b),  # binary samples: a header, then anything
    st.lists(st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=5), st.booleans(), st.none(), st.lists(st.integers(0, 2))),
             max_size=15).map(lambda v: msgspec.msgpack.encode([2, *v])),
))  # fmt: skip
def test_sample_parser(raw: bytes) -> None:
    try:
        parse_sample(raw)
    except InvalidSample as exc:
        assert exc.reason in PARSE_REASONS


ENV = st.dictionaries(
    st.sampled_from(
        ["EVENT_PARTITIONS", "KAFKA_SECURITY_PROTOCOL", "METRICS_PORT_JOINER", "DATA_DIR", "KAFKA_SESSION_TIMEOUT_MS",
         "KAFKA_SASL_MECHANISM", "TOPIC_CLICKS", "JOINER_POLICY"]
    ),
    st.text(max_size=20).filter(lambda s: "\x00" not in s),
    max_size=4,
)  # fmt: skip


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ENV)
def test_settings_from_any_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    with monkeypatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        try:
            s = Settings()
        except ValidationError as exc:
            assert exc.errors()  # a clear, field-by-field error
            return
        assert s.event_partitions >= 1


# --- model-version announcements and HTTP scoring requests ---------------------------------------

from stream.contract.versions import InvalidVersion, ModelVersion, encode_version, parse_version  # noqa: E402
from stream.serve.http import BadRequest, parse_request  # noqa: E402

near_versions = st.fixed_dictionaries(
    {},
    optional={
        "schema_version": st.one_of(st.just(1), json_scalars),
        "version": st.one_of(st.integers(min_value=-3, max_value=2**40), json_scalars),
        "path": st.one_of(st.text(min_size=1, max_size=50), json_scalars),
        "sha256": st.one_of(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), json_scalars),
        "trained_samples": st.one_of(st.integers(min_value=-3, max_value=2**40), json_scalars),
        "created_at_ms": st.integers(min_value=-3, max_value=2**50),
        "max_sample_consumed_at_ms": st.integers(min_value=-3, max_value=2**50),
        "min_new_sample_consumed_at_ms": st.integers(min_value=-3, max_value=2**50),
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(near_versions.map(lambda d: json.dumps(d, allow_nan=True).encode()), st.binary(max_size=300)))
def test_model_version_announcements(raw: bytes) -> None:
    try:
        v = parse_version(raw)
    except InvalidVersion as exc:
        assert exc.reason in PARSE_REASONS and str(exc)
        return
    assert isinstance(v, ModelVersion)
    assert parse_version(encode_version(v)) == v


near_requests = st.fixed_dictionaries(
    {},
    optional={
        "bank_id": st.one_of(st.text(max_size=140), json_scalars),
        "features": st.one_of(st.dictionaries(st.text(max_size=300), st.text(max_size=300), max_size=6), json_values),
        "impression_id": st.one_of(st.text(max_size=140), json_scalars),
        "extra": json_values,
    },
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(near_requests.map(lambda d: json.dumps(d, allow_nan=True).encode()), st.binary(max_size=500)))
def test_http_scoring_requests(body: bytes) -> None:
    try:
        bank, feats, iid = parse_request(body)
    except BadRequest as exc:
        assert 400 <= exc.code < 500 and exc.message  # a clear 4xx, never a 500
        return
    assert isinstance(bank, str) and isinstance(feats, dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in feats.items())
    assert iid is None or isinstance(iid, str)
