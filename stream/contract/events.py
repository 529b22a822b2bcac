"""The event contract: funnel events on five topics, keyed by impression id.

Every value is a JSON object::

    {"schema_version": 1, "event_type": "click", "event_id": "c-42", "impression_id": "i-42",
     "event_time_ms": 1767225600000, "bank_id": "bank_2"}

Impressions also carry ``"features": {field: value}`` (string -> string). ``parse_event``
validates a raw record and raises ``InvalidEvent`` (a reason code plus a sentence saying what is
wrong and how to fix it); workers send such records to the dead-letter topic.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec

from stream.contract.frozen import fast_new

SCHEMA_VERSION: Final = 1
STEPS: Final = ("impression", "click", "application", "approval", "activation")
TASKS: Final = STEPS[1:]
STEP_INDEX: Final = {name: i for i, name in enumerate(STEPS)}

MAX_ID_LEN: Final = 128
MAX_FEATURES: Final = 256
MAX_FEATURE_LEN: Final = 256
MAX_EVENT_TIME_MS: Final = 2**53
MAX_RECORD_BYTES: Final = 64 * 1024

# Reason codes of parse errors (also the dead-letter reasons and a metrics label).
MALFORMED_JSON: Final = "malformed_json"
MISSING_FIELD: Final = "missing_field"
INVALID_FIELD: Final = "invalid_field"
UNSUPPORTED_SCHEMA: Final = "unsupported_schema"
WRONG_TOPIC: Final = "wrong_topic"
MALFORMED_MSGPACK: Final = "malformed_msgpack"  # binary samples only (stream/contract/samples.py)
PARSE_REASONS: Final = (
    MALFORMED_JSON,
    MALFORMED_MSGPACK,
    MISSING_FIELD,
    INVALID_FIELD,
    UNSUPPORTED_SCHEMA,
    WRONG_TOPIC,
)


class InvalidRecord(ValueError):
    """A record that breaks a contract; ``reason`` is a short code (a dead letter's reason), the
    message says why. Each boundary raises its own subclass: ``InvalidEvent`` (the five event
    topics), ``stream.contract.samples.InvalidSample``, ``stream.ops.model_store.InvalidVersion``;
    ``loads_strict`` raises this base class (bad JSON is the same whatever the record)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class InvalidEvent(InvalidRecord):
    """A funnel event that breaks the event contract."""


@dataclass(frozen=True, slots=True)
class Event:
    """One funnel event. ``step`` indexes ``STEPS`` (0 = impression ... 4 = activation)."""

    step: int
    event_id: str
    impression_id: str
    event_time_ms: int
    bank_id: str
    features: Mapping[str, str] | None = None

    @property
    def event_type(self) -> str:
        return STEPS[self.step]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "event_type": STEPS[self.step],
            "event_id": self.event_id,
            "impression_id": self.impression_id,
            "event_time_ms": self.event_time_ms,
            "bank_id": self.bank_id,
        }
        if self.features is not None:
            d["features"] = dict(self.features)
        return d


_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LEN)]
_new_event: Final = fast_new(Event)  # the decode's constructor (stream/contract/frozen.py)


def encode_event(event: Event) -> bytes:
    """The record value for ``event`` (compact JSON, UTF-8)."""
    return json.dumps(event.to_dict(), separators=(",", ":")).encode()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # in C; a shorter dict means a key was repeated
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidRecord(MALFORMED_JSON, f"duplicate key {key!r} in the JSON object")
            seen.add(key)
    return out


def _reject_constant(name: str) -> Any:
    raise InvalidRecord(MALFORMED_JSON, f"{name} is not valid JSON; send a finite number")


# Built once: ``json.loads`` with a hook builds a new decoder (and scanner) on every call.
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
# the C scanner behind decode(): (text, index) -> (value, end); typeshed does not declare it
_scan_once: Final[Callable[[str, int], tuple[Any, int]]] = vars(_DECODER)["scan_once"]


def loads_strict(
    raw: bytes | str,
    what: str = "record",
    error: type[InvalidRecord] = InvalidRecord,
    max_bytes: int = MAX_RECORD_BYTES,
) -> Any:
    """``json.loads`` that refuses NaN/Infinity, duplicate keys, bad UTF-8 and inputs over
    ``max_bytes``, raising ``error`` (the caller's boundary's type) with reason ``malformed_json``."""
    if len(raw) > max_bytes:
        raise error(MALFORMED_JSON, f"{what} is {len(raw)} bytes; at most {max_bytes} allowed")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
        try:  # fast path: a value that starts at 0 and fills the text (what producers send)
            obj, end = _scan_once(text, 0)
        except StopIteration:  # leading whitespace, or no value at all: the full decoder judges
            return _DECODER.decode(text)
        if end != len(text):  # trailing whitespace or extra data
            return _DECODER.decode(text)
        return obj
    except InvalidRecord as exc:  # from the decoder's hooks
        raise error(exc.reason, exc.message) from None
    except UnicodeDecodeError as exc:
        raise error(MALFORMED_JSON, f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except RecursionError:
        raise error(MALFORMED_JSON, f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise error(MALFORMED_JSON, f"{what} is not valid JSON: {exc}") from None


def _str_field(obj: Mapping[str, Any], name: str, max_len: int = MAX_ID_LEN) -> str:
    if name not in obj:
        raise InvalidEvent(MISSING_FIELD, f"field {name!r} is missing; every event needs it")
    value = obj[name]
    if not isinstance(value, str) or not value:
        raise InvalidEvent(INVALID_FIELD, f"field {name!r} must be a non-empty string, got {value!r:.60}")
    if len(value) > max_len:
        raise InvalidEvent(INVALID_FIELD, f"field {name!r} is {len(value)} characters; at most {max_len}")
    if not value.isprintable():
        raise InvalidEvent(INVALID_FIELD, f"field {name!r} has non-printable characters")
    return value


def _features(obj: Mapping[str, Any]) -> dict[str, str]:
    if "features" not in obj:
        raise InvalidEvent(MISSING_FIELD, "field 'features' is missing; impressions carry their feature map")
    try:
        return validate_features(obj["features"])
    except InvalidRecord as exc:
        raise InvalidEvent(exc.reason, exc.message) from None


def validate_features(feats: Any) -> dict[str, str]:
    """A feature map (an impression's, a scoring request's): string names -> string values, at
    most ``MAX_FEATURES`` of them, none empty or longer than ``MAX_FEATURE_LEN``; else
    ``InvalidRecord`` (``invalid_field``) saying which."""
    if not isinstance(feats, dict):
        raise InvalidRecord(INVALID_FIELD, "'features' must be an object of feature name -> string value")
    if len(feats) > MAX_FEATURES:
        raise InvalidRecord(INVALID_FIELD, f"'features' has {len(feats)} fields; at most {MAX_FEATURES}")
    values = feats.values()
    if (  # fast path (in C): all strings, no empty name, nothing too long
        _STR_ONLY.issuperset(map(type, values))
        and "" not in feats
        and max(map(len, feats), default=0) <= MAX_FEATURE_LEN
        and max(map(len, values), default=0) <= MAX_FEATURE_LEN
    ):
        return feats
    for key, value in feats.items():
        if not isinstance(value, str):
            raise InvalidRecord(
                INVALID_FIELD, f"feature {key!r:.40} must be a string, got {type(value).__name__}"
            )
        if len(key) > MAX_FEATURE_LEN or len(value) > MAX_FEATURE_LEN or not key:
            raise InvalidRecord(
                INVALID_FIELD, f"feature {key!r:.40} name or value is empty or longer than {MAX_FEATURE_LEN}"
            )
    return feats


_STR_ONLY: Final = frozenset({str})


def parse_event(raw: bytes | str, expected_type: str | None = None) -> Event:
    """Validate one record value; ``expected_type`` is the step its topic carries.

    >>> parse_event(b'{"schema_version":1,"event_type":"click","event_id":"e","impression_id":"i",'
    ...             b'"event_time_ms":5,"bank_id":"b"}').step
    1
    """
    return event_from_json(loads_strict(raw, "event", InvalidEvent), expected_type)


def event_from_json(obj: Any, expected_type: str | None = None) -> Event:
    """The checks of ``parse_event`` on a decoded JSON value (``loads_strict``'s result)."""
    if type(obj) is dict:  # fast path: a well-formed event, checked in one expression
        get = obj.get
        eid, iid, bank, etype, ts = get("event_id"), get("impression_id"), get("bank_id"), get("event_type"), get("event_time_ms")
        step = STEP_INDEX.get(etype) if type(etype) is str else None  # fmt: skip
        if (
            step is not None
            and (expected_type is None or etype == expected_type)
            and type(get("schema_version")) is int and obj["schema_version"] == SCHEMA_VERSION
            and type(ts) is int and 0 <= ts < MAX_EVENT_TIME_MS
            and type(eid) is str and type(iid) is str and type(bank) is str
            and 0 < len(eid) <= MAX_ID_LEN and 0 < len(iid) <= MAX_ID_LEN and 0 < len(bank) <= MAX_ID_LEN
            and eid.isprintable() and iid.isprintable() and bank.isprintable()
        ):  # fmt: skip
            return _new_event(step, eid, iid, ts, bank, _features(obj) if step == 0 else None)
    return _event_from_json_checked(obj, expected_type)


def _event_from_json_checked(obj: Any, expected_type: str | None) -> Event:
    """Every check in turn, so that the first thing wrong is the one reported."""
    if not isinstance(obj, dict):
        raise InvalidEvent(MALFORMED_JSON, f"event must be a JSON object, got {type(obj).__name__}")
    if "schema_version" not in obj:
        raise InvalidEvent(MISSING_FIELD, "field 'schema_version' is missing; set it to 1")
    version = obj["schema_version"]
    if type(version) is not int or version != SCHEMA_VERSION:
        raise InvalidEvent(
            UNSUPPORTED_SCHEMA,
            f"schema_version {version!r:.20} is not supported; this reader knows 1",
        )
    event_type = _str_field(obj, "event_type")
    step = STEP_INDEX.get(event_type)
    if step is None:
        raise InvalidEvent(INVALID_FIELD, f"event_type {event_type!r:.40} is not one of {', '.join(STEPS)}")
    if expected_type is not None and event_type != expected_type:
        raise InvalidEvent(WRONG_TOPIC, f"a {event_type} event on the {expected_type} topic")
    if "event_time_ms" not in obj:
        raise InvalidEvent(MISSING_FIELD, "field 'event_time_ms' is missing; send epoch milliseconds")
    ts = obj["event_time_ms"]
    if type(ts) is not int:
        if isinstance(ts, float) and math.isfinite(ts) and ts.is_integer():
            ts = int(ts)
        else:
            raise InvalidEvent(INVALID_FIELD, f"event_time_ms must be integer epoch ms, got {ts!r:.40}")
    if not 0 <= ts < MAX_EVENT_TIME_MS:
        raise InvalidEvent(INVALID_FIELD, f"event_time_ms {ts} is out of range [0, 2^53)")
    return Event(
        step=step,
        event_id=_str_field(obj, "event_id"),
        impression_id=_str_field(obj, "impression_id"),
        event_time_ms=ts,
        bank_id=_str_field(obj, "bank_id"),
        features=_features(obj) if step == 0 else None,
    )


def parse_events(raws: Sequence[bytes | None], expected_types: Sequence[str | None]) -> list[Event | InvalidEvent]:
    """``parse_event`` over a fetched batch: per record its ``Event``, or the ``InvalidEvent`` that
    ``parse_event`` raises for it (same reason, same words; a missing value - a tombstone - is
    ``malformed_json``).

    Each record is first read by ``fast_event`` (msgspec's C decoder, no Python call per JSON
    object, and a byte count that rules out duplicate keys); what it cannot vouch for - anything
    malformed, escaped, oversized, of the wrong shape - goes through ``parse_events_strict``, the
    strict decoder, so every bad record gets the strict path's reason and words.

    >>> ok = b'{"schema_version":1,"event_type":"click","event_id":"e","impression_id":"i",' \\
    ...      b'"event_time_ms":5,"bank_id":"b"}'
    >>> [type(x).__name__ for x in parse_events([ok, b'{"a":1,"a":2}', None, b"1", b"2"], ["click"] * 5)]
    ['Event', 'InvalidEvent', 'InvalidEvent', 'InvalidEvent', 'InvalidEvent']
    """
    fast = fast_event
    out: list[Event | InvalidEvent | None] = [
        fast(raw, etype) if raw is not None else None for raw, etype in zip(raws, expected_types, strict=True)
    ]
    misses = [i for i, ev in enumerate(out) if ev is None]
    if misses:
        slow = parse_events_strict([raws[i] for i in misses], [expected_types[i] for i in misses])
        for i, ev in zip(misses, slow, strict=True):
            out[i] = ev
    return out  # type: ignore[return-value]  # every None was filled above


class _Wire(msgspec.Struct, forbid_unknown_fields=True):
    """An event as ``fast_event`` decodes it: the contract's fields, types and bounds, checked by
    msgspec in C (``Event`` is built from it; the rest of the checks are ``fast_event``'s)."""

    schema_version: int
    event_type: str
    event_id: _Id
    impression_id: _Id
    event_time_ms: Annotated[int, msgspec.Meta(ge=0, lt=MAX_EVENT_TIME_MS)]
    bank_id: _Id
    features: (
        Annotated[
            dict[
                Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_FEATURE_LEN)],
                Annotated[str, msgspec.Meta(max_length=MAX_FEATURE_LEN)],
            ],
            msgspec.Meta(max_length=MAX_FEATURES),
        ]
        | None
    ) = None


# msgspec keeps the last of duplicate keys silently: ``fast_event`` rules those out by a count.
_FAST_DECODE: Final = msgspec.json.Decoder(_Wire).decode
_FAST_ERRORS: Final = (msgspec.DecodeError, ValueError)  # ValidationError is a DecodeError; bad UTF-8
_QUOTE: Final = b'"'
_BACKSLASH: Final = b"\\"


def fast_event(raw: bytes, expected_type: str | None = None) -> Event | None:
    """The ``Event`` of a well-formed record, decoded without a Python call per JSON object, or
    ``None`` when this path cannot vouch for the record: the caller then runs the strict decode,
    which gives the same ``Event`` or the clear error.

    A record is vouched for only when msgspec decodes it into ``_Wire`` (exactly the contract's
    fields, with their types and bounds), the rest of the contract holds, and the raw bytes hold
    no backslash and exactly two ``"`` per string the decoded event holds. Why that rules out a
    duplicate key at any depth: with no backslash there is no escape, so every ``"`` in valid
    JSON opens or closes a string, and every string of the record is one the event holds unless
    a pair was overwritten by a later pair with the same key - whose key is one more string. The
    event holds its field names, 4 string values (type, three ids) and 2 strings per feature,
    so any duplicate pair makes the count larger. Without escapes a key has one spelling (no
    ``"\\u0061"`` for ``"a"``); msgspec refuses NaN, Infinity, bad UTF-8, control characters,
    floats and booleans for integers, and trailing data, as the strict decode does.
    """
    if len(raw) > MAX_RECORD_BYTES or _BACKSLASH in raw:
        return None
    try:
        w = _FAST_DECODE(raw)
    except _FAST_ERRORS:
        return None
    etype, eid, iid, bank, feats = w.event_type, w.event_id, w.impression_id, w.bank_id, w.features
    step = STEP_INDEX.get(etype)
    if (
        step is None
        or (expected_type is not None and etype != expected_type)
        or w.schema_version != SCHEMA_VERSION
        or not (eid.isprintable() and iid.isprintable() and bank.isprintable())
        or raw.count(_QUOTE) != (20 if feats is None else 22 + 4 * len(feats))  # 2 x strings
    ):
        return None
    if step:
        return _new_event(step, eid, iid, w.event_time_ms, bank, None)
    if feats is None:
        return None
    return _new_event(0, eid, iid, w.event_time_ms, bank, feats)


def parse_events_strict(
    raws: Sequence[bytes | None], expected_types: Sequence[str | None]
) -> list[Event | InvalidEvent]:
    """``parse_events`` by the strict decoder alone (``parse_events`` sends it what ``fast_event``
    cannot vouch for).

    The batch's ASCII records are joined and decoded to text once; then the strict decoder's C
    scanner (the one ``loads_strict`` uses: duplicate keys at any depth and NaN/Infinity refused)
    reads each record at its own offset. A record counts as decoded only when the value read there
    ends exactly where the record ends, i.e. the record is one JSON value and nothing else; any
    other record - malformed, padded with whitespace, oversized, not ASCII (its byte and character
    offsets differ: non-UTF-8 bytes, or text that is valid but rare on these topics) or missing -
    goes through ``parse_event`` itself, so its error is the per-record one.
    """
    out: list[Event | InvalidEvent] = []
    append = out.append
    ascii_ok = [raw is not None and raw.isascii() for raw in raws]
    text = b"".join([raw for raw, ok in zip(raws, ascii_ok, strict=True) if ok]).decode("ascii")  # type: ignore[misc]
    scan = _scan_once
    pos = 0
    for raw, etype, ok in zip(raws, expected_types, ascii_ok, strict=True):
        if not ok:  # a tombstone, or not ASCII (byte and character offsets differ): alone
            append(_parse_one(raw, etype))
            continue
        end = pos + len(raw)  # type: ignore[arg-type]
        try:
            obj, stop = scan(text, pos)
            if stop != end or end - pos > MAX_RECORD_BYTES:
                obj = _NOT_ONE
        except (StopIteration, InvalidRecord, ValueError, RecursionError):
            obj = _NOT_ONE
        if obj is _NOT_ONE:
            append(_parse_one(raw, etype))
        else:
            try:
                append(event_from_json(obj, etype))
            except InvalidEvent as exc:
                append(_detached(exc))
        pos = end
    return out


_NOT_ONE: Final[Any] = object()  # "this record is not exactly one JSON value: parse it alone"


def _detached(exc: InvalidEvent) -> InvalidEvent:
    """``exc`` as a value: without its traceback and the exceptions it came from. A caught
    exception's traceback holds the frames it went through, whose locals hold the batch and
    (where it is stored) the exception itself: a reference cycle that kept a whole batch alive
    until the cycle collector found it, and made its passes longer (docs/joiner.md, round 21). Its
    reason and message are all a dead letter reads."""
    exc.__traceback__ = None
    exc.__cause__ = exc.__context__ = None
    return exc


def _parse_one(raw: bytes | None, expected_type: str | None) -> Event | InvalidEvent:
    try:
        return parse_event(raw if raw is not None else b"", expected_type)
    except InvalidEvent as exc:
        return _detached(exc)


def dead_letter(
    raw: bytes | None,
    *,
    source_topic: str,
    reason: str,
    detail: str,
    partition: int | None = None,
    offset: int | None = None,
    key: bytes | None = None,
    time_ms: int | None = None,
) -> bytes:
    """A dead-letter record: the raw value (UTF-8 text, or base64 when not text) and why."""
    text: str | None
    encoding = "utf-8"
    try:
        text = raw.decode("utf-8") if raw is not None else None
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(raw or b"").decode(), "base64"
    record = {
        "schema_version": SCHEMA_VERSION,
        "source_topic": source_topic,
        "partition": partition,
        "offset": offset,
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "reason": reason,
        "detail": detail,
        "raw": text,
        "raw_encoding": encoding,
        "time_ms": time_ms,
    }
    return json.dumps(record, separators=(",", ":")).encode()
