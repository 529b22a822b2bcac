"""The training sample record on the ``samples`` topic, and its two encodings.

Labels and masks are per task in funnel order (click, application, approval, activation).
``seq`` orders one impression's samples (first 0, a correction uses the step it turned positive,
1..4, final 5): downstream deduplicates on ``(impression_id, seq)``.

- ``json`` (schema version 1): a JSON object, readable with ``kcat``; about 15-20 us a sample to
  parse and check in Python.
- ``msgpack`` (schema version 2): one MessagePack array of the ``SampleRecord`` fields in order,
  the version first: its first two bytes are ``9c 02`` (a fixarray header, which no JSON text
  starts with, then the version). msgspec decodes and type-checks it in C straight into a
  ``SampleRecord``; the feed turns a chunk of them into columns about 7x faster than JSON.
  A reader ignores array items past the ones it knows (a later writer may append fields); a
  layout change that old readers cannot skip takes a new version number.

Readers tell the two apart by the first byte (``decode_record``, ``parse_sample``), so a trainer
reads a topic that holds both while the joiners switch (``SAMPLES_ENCODING``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter
from typing import Annotated, Any, Final, Literal, NoReturn, cast

import msgspec

from stream.contract.events import MALFORMED_MSGPACK, InvalidRecord, loads_strict

SAMPLE_SCHEMA_VERSION: Final = 1
BINARY_SCHEMA_VERSION: Final = 2
ENCODINGS: Final = ("json", "msgpack")
SampleEncoding = Literal["json", "msgpack"]
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
    b'"labels":[%b],"mature":[%b],"kind":%b,"elapsed_ms":%d,"seq":%d,"watermark_ms":%d,"policy":%b}'
)
# the few values a sample's fields take (labels and mature: 16 each; kind, policy: a handful;
# banks: a few dozen), encoded once: a sample then costs one quoted id and one % format
_LABELS: Final[dict[tuple[int, int, int, int], bytes]] = {}
_MATURE: Final[dict[tuple[bool, bool, bool, bool], bytes]] = {}
_QUOTED: Final[dict[str, bytes]] = {}  # kind, policy and bank ids, JSON-quoted
_QUOTED_MAX: Final = 4096  # cleared when full (bank ids are few; this only bounds a bad stream)


def _quoted(text: str) -> bytes:
    q = _QUOTED.get(text)
    if q is None:
        if len(_QUOTED) >= _QUOTED_MAX:
            _QUOTED.clear()
        q = _QUOTED[text] = _json_str(text).encode()
    return q


def _labels_json(labels: tuple[int, int, int, int]) -> bytes:
    b = _LABELS.get(labels)
    if b is None:
        b = b"%d,%d,%d,%d" % tuple(labels)
        if len(_LABELS) < 64:  # well-formed labels are 0/1: 16 keys
            _LABELS[labels] = b
    return b


def _mature_json(mature: tuple[bool, bool, bool, bool]) -> bytes:
    b = _MATURE.get(mature)
    if b is None:
        b = b",".join(_BOOL[m] for m in mature)
        if len(_MATURE) < 64:
            _MATURE[mature] = b
    return b


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
        SAMPLE_SCHEMA_VERSION, _json_str(impression_id).encode(), _QUOTED.get(bank_id) or _quoted(bank_id),
        event_time_ms, features_json, _LABELS.get(labels) or _labels_json(labels),
        _MATURE.get(mature) or _mature_json(mature), _QUOTED.get(kind) or _quoted(kind), elapsed_ms, seq,
        watermark_ms, _QUOTED.get(policy) or _quoted(policy),
    )  # fmt: skip


def _four(obj: dict[str, Any], name: str, kind: type) -> tuple[Any, Any, Any, Any]:
    v = obj.get(name)
    if not isinstance(v, list) or len(v) != 4 or not all(type(x) is kind for x in v):
        raise InvalidSample("invalid_field", f"sample field {name!r} must be a list of 4 {kind.__name__}")
    return (v[0], v[1], v[2], v[3])


def validate_sample(raw: bytes | str) -> dict[str, Any]:
    """Check one ``samples`` record; its JSON object (a binary record: the same keys), or
    ``InvalidSample`` saying what is wrong."""
    if isinstance(raw, bytes | bytearray | memoryview) and is_binary(raw):
        r = decode_binary(raw)
        x = r.sample()
        return {
            "schema_version": BINARY_SCHEMA_VERSION, "impression_id": r.impression_id, "bank_id": r.bank_id,
            "event_time_ms": r.event_time_ms, "features": r.features, "labels": list(x.labels),
            "mature": list(x.mature), "kind": x.kind, "elapsed_ms": r.elapsed_ms, "seq": r.seq,
            "watermark_ms": r.watermark_ms, "policy": r.policy,
        }  # fmt: skip
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
    """Validate one ``samples`` record (either encoding) into a ``Sample``; raises ``InvalidSample``
    saying what is wrong."""
    if isinstance(raw, bytes | bytearray | memoryview) and is_binary(raw):
        return decode_binary(raw).sample()
    return sample_from_valid(validate_sample(raw))


# --- the binary encoding (schema version 2) --------------------------------------------------

Flags = Annotated[int, msgspec.Meta(ge=0, le=255)]  # bit t: label of task t; bit 4 + t: task t mature
KindCode = Annotated[int, msgspec.Meta(ge=0, le=len(KINDS) - 1)]  # the index in ``KINDS``


class SampleRecord(msgspec.Struct, array_like=True, gc=False):
    """One sample as the binary encoding carries it, field by field in this order; also the row
    the trainer's feed builds columns from, whichever encoding the sample came in.

    The feature map travels as two arrays, names and values: the names stay undecoded
    (``msgspec.Raw``) and are checked once per distinct field list (``feature_names``), so a
    chunk whose samples share one field list becomes columns by one transpose. Labels and
    maturity are one byte of bit flags, the kind its index in ``KINDS``: numbers that become
    columns without a Python object per label.
    """

    schema_version: int
    impression_id: str
    bank_id: str
    event_time_ms: int
    names: msgspec.Raw  # MessagePack array of str: the feature fields
    values: tuple[str, ...]  # the feature values, in the order of ``names``
    flags: Flags
    kind: KindCode
    elapsed_ms: int
    seq: int
    watermark_ms: int
    policy: str

    @property
    def features(self) -> dict[str, str]:
        return dict(zip(feature_names(bytes(self.names)), self.values, strict=True))

    def sample(self) -> Sample:
        f = self.flags
        return Sample(
            self.impression_id, self.bank_id, self.event_time_ms, self.features,
            (f & 1, f >> 1 & 1, f >> 2 & 1, f >> 3 & 1), (f & 16 > 0, f & 32 > 0, f & 64 > 0, f & 128 > 0),
            _KIND_NAMES[self.kind], self.elapsed_ms, self.seq, self.watermark_ms, self.policy,
        )  # fmt: skip


_KIND_NAMES: Final[tuple[Literal["first"], Literal["correction"], Literal["final"]]] = ("first", "correction", "final")
_KIND_CODE: Final = {k: i for i, k in enumerate(KINDS)}


def pack_flags(labels: tuple[int, int, int, int], mature: tuple[bool, bool, bool, bool]) -> int:
    """Labels (0/1) and maturity of the four tasks as the binary encoding's one byte of flags."""
    return (labels[0] | labels[1] << 1 | labels[2] << 2 | labels[3] << 3
            | mature[0] << 4 | mature[1] << 5 | mature[2] << 6 | mature[3] << 7)  # fmt: skip


FIELDS: Final = SampleRecord.__struct_fields__
_decoder = msgspec.msgpack.Decoder(SampleRecord)
_names_decoder = msgspec.msgpack.Decoder(tuple[str, ...])
_encoder = msgspec.msgpack.Encoder()
_AT = re.compile(r"\$\[(\d+)\]")
_SHORT = re.compile(r"of at least length \d+, got (\d+)")


def is_binary(raw: bytes | bytearray | memoryview) -> bool:
    """True for a binary record: its first byte is a MessagePack array header (``0x90..0x9f``,
    ``0xdc``, ``0xdd``), which no JSON text starts with."""
    return len(raw) > 0 and (raw[0] & 0xF0 == 0x90 or raw[0] in (0xDC, 0xDD))


@lru_cache(maxsize=1024)
def feature_names(packed: bytes) -> tuple[str, ...]:
    """The feature field names of a binary record's ``names`` (checked: strings, no repeats)."""
    try:
        names = _names_decoder.decode(packed)
    except (msgspec.MsgspecError, ValueError, RecursionError) as exc:
        raise InvalidSample("invalid_field", f"binary sample: feature names must be an array of strings ({exc})") from None
    if len(set(names)) != len(names):
        raise InvalidSample("invalid_field", "binary sample: a feature name appears twice")
    return names


def _field_path(message: str) -> str:
    """msgspec's ``$[6]`` (array position) as ``$.kind`` (the field's name)."""

    def name(m: re.Match[str]) -> str:
        i = int(m.group(1))
        return f"$.{FIELDS[i]}" if i < len(FIELDS) else m.group(0)

    return _AT.sub(name, message, count=1)


def decode_binary(raw: bytes | bytearray | memoryview) -> SampleRecord:
    """Decode and check one binary record; ``InvalidSample`` saying what is wrong if it is not one."""
    try:
        r = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        _check_version(raw)
        text = _field_path(str(exc))
        short = _SHORT.search(text)
        if short is not None and int(short.group(1)) < len(FIELDS):
            missing = FIELDS[int(short.group(1))]
            raise InvalidSample("missing_field", f"binary sample field {missing!r} is missing ({text})") from None
        raise InvalidSample("invalid_field", f"binary sample: {text}") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:  # a string that is not UTF-8
        _check_version(raw)
        raise InvalidSample(MALFORMED_MSGPACK, f"binary sample is not valid MessagePack: {exc}") from None
    if r.schema_version != BINARY_SCHEMA_VERSION:
        _unsupported(r.schema_version)
    if len(feature_names(bytes(r.names))) != len(r.values):
        raise InvalidSample("invalid_field", "binary sample: feature names and values differ in number")
    return r


def _unsupported(version: object) -> NoReturn:
    raise InvalidSample(
        "unsupported_schema", f"binary sample schema_version {version!r:.20}; this reader knows {BINARY_SCHEMA_VERSION}"
    )


def _check_version(raw: bytes | bytearray | memoryview) -> None:
    """A record that did not decode: say so if its version (the item after a fixarray header) is not ours."""
    if len(raw) > 1 and raw[0] & 0xF0 == 0x90 and raw[1] != BINARY_SCHEMA_VERSION:
        _unsupported(raw[1] if raw[1] < 0x80 else f"0x{raw[1]:02x}")


def decode_records(raws: Sequence[bytes | None]) -> tuple[list[SampleRecord], list[tuple[int, InvalidSample]]]:
    """Records of either encoding, in order: the good ones, and ``(index, error)`` for the rest.

    The usual chunk (binary records of one field list) is decoded by one C-level ``map`` and
    checked per chunk; anything else (JSON, a bad record, several field lists) record by record.
    """
    try:
        recs = list(map(_decoder.decode, cast(Sequence[bytes], raws)))  # None: TypeError, below
    except (msgspec.MsgspecError, ValueError, TypeError, RecursionError):  # TypeError: a None value
        recs = None
    if recs:
        packed = set(map(bytes, map(attrgetter("names"), recs)))
        if (
            len(packed) == 1
            and set(map(attrgetter("schema_version"), recs)) == {BINARY_SCHEMA_VERSION}
            and set(map(len, map(attrgetter("values"), recs))) == {len(feature_names(next(iter(packed))))}
        ):  # fmt: skip
            return recs, []
    good: list[SampleRecord] = []
    bad: list[tuple[int, InvalidSample]] = []
    for i, raw in enumerate(raws):
        try:
            good.append(decode_record(raw or b""))
        except InvalidSample as exc:
            bad.append((i, exc))
    return good, bad


@lru_cache(maxsize=1024)
def _packed_names(names: tuple[str, ...]) -> msgspec.Raw:
    return msgspec.Raw(_encoder.encode(names))


def record_from_valid(obj: dict[str, Any]) -> SampleRecord:
    """The ``SampleRecord`` of an object ``validate_sample`` accepted."""
    labels, mature, feats = obj["labels"], obj["mature"], obj["features"]
    return SampleRecord(
        BINARY_SCHEMA_VERSION, obj["impression_id"], obj["bank_id"], obj["event_time_ms"],
        _packed_names(tuple(feats)), tuple(feats.values()),
        pack_flags((labels[0], labels[1], labels[2], labels[3]), (mature[0], mature[1], mature[2], mature[3])),
        _KIND_CODE[obj["kind"]], obj["elapsed_ms"], obj["seq"], obj["watermark_ms"], obj["policy"],
    )  # fmt: skip


def decode_record(raw: bytes) -> SampleRecord:
    """One ``samples`` record of either encoding (told apart by its first byte), checked; the feed's path."""
    if is_binary(raw):
        return decode_binary(raw)
    return record_from_valid(validate_sample(raw))


def encode_binary(s: Sample) -> bytes:
    """``s`` in the binary encoding."""
    return _encoder.encode(
        (BINARY_SCHEMA_VERSION, s.impression_id, s.bank_id, s.event_time_ms, _packed_names(tuple(s.features)),
         tuple(s.features.values()), pack_flags(s.labels, s.mature), _KIND_CODE[s.kind], s.elapsed_ms, s.seq,
         s.watermark_ms, s.policy)
    )  # fmt: skip


@lru_cache(maxsize=8192)
def _packed_features(features_json: bytes) -> tuple[msgspec.Raw, msgspec.Raw]:
    """A feature map's compact JSON as the binary names and values (cached: an impression's samples share it)."""
    feats = msgspec.json.decode(features_json)
    return _packed_names(tuple(feats)), msgspec.Raw(_encoder.encode(tuple(feats.values())))


def sample_binary(
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
    """``encode_binary`` byte for byte, from the joiner's pre-encoded feature JSON (``sample_bytes``'s twin).

    A sample the binary form cannot carry (a feature string that is not Unicode text, e.g. a lone
    surrogate that JSON's ``\\udc80`` escape lets through) goes out in the JSON form instead:
    readers take either, and the joiner never stops on one odd impression.
    """
    try:
        names, values = _packed_features(features_json)
        return _encoder.encode(
            (BINARY_SCHEMA_VERSION, impression_id, bank_id, event_time_ms, names, values, pack_flags(labels, mature),
             _KIND_CODE[kind], elapsed_ms, seq, watermark_ms, policy)
        )  # fmt: skip
    except (msgspec.MsgspecError, UnicodeError):
        return sample_bytes(impression_id, bank_id, event_time_ms, features_json, labels, mature, kind, elapsed_ms,
                            seq, watermark_ms, policy)  # fmt: skip


SAMPLE_WRITERS: Final = {"json": sample_bytes, "msgpack": sample_binary}
SAMPLE_ENCODERS: Final = {"json": encode_sample, "msgpack": encode_binary}
