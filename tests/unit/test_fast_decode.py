"""The fast event decode (``fast_event``: msgspec plus a byte count against duplicate keys) agrees
with the strict decode on every record: the same ``Event``, or it stands aside and the strict
path gives the record its clear reason (duplicate keys at any depth and in any spelling, NaN,
Infinity, huge numbers, sizes, wrong types, non-ASCII text)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.contract.events import (
    MALFORMED_JSON,
    MAX_RECORD_BYTES,
    STEPS,
    Event,
    InvalidEvent,
    encode_event,
    fast_event,
    parse_events,
    parse_events_strict,
)

# A JSON document as a tree the writer below spells out: an object is ("obj", [(key, value), ...])
# (a list of pairs, so a key can repeat), a bare literal is ("lit", "NaN"), lists are lists.
Obj = tuple[str, Any]


def _spell(s: str, how: str) -> str:
    """A JSON string literal for ``s``: plain UTF-8, ``json``'s ASCII escapes, or every character
    as a \\u escape (so "a" can be written "\\u0061")."""
    if how == "plain":
        return json.dumps(s, ensure_ascii=False)
    if how == "ascii":
        return json.dumps(s)
    return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else json.dumps(c)[1:-1] for c in s) + '"'


def _write(value: Any, how: str, key_how: dict[int, str]) -> str:
    """``value`` as JSON text: strings spelled ``how``, the i-th key of every object spelled
    ``key_how[i]`` (plain when absent)."""
    if isinstance(value, tuple) and value[0] == "obj":
        parts = [f"{_spell(k, key_how.get(i, 'plain'))}:{_write(v, how, key_how)}" for i, (k, v) in enumerate(value[1])]
        return "{" + ",".join(parts) + "}"
    if isinstance(value, tuple) and value[0] == "lit":
        return str(value[1])
    if isinstance(value, list):
        return "[" + ",".join(_write(v, how, key_how) for v in value) + "]"
    if isinstance(value, str):
        return _spell(value, how)
    return json.dumps(value)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten, else ``bad`` (so that many records are well formed)."""
    return st.integers(0, 9).flatmap(lambda i: bad if i == 0 else good)


plain_ids = st.from_regex(r"[a-z0-9/_-]{1,20}", fullmatch=True)
ids = st.one_of(
    st.from_regex(r"[a-z0-9/_-]{1,20}", fullmatch=True),
    st.text(min_size=1, max_size=20),  # any text: non-ASCII, control characters, surrogates
    st.text(min_size=120, max_size=140),  # around the 128-character limit
)
odd = st.one_of(
    st.tuples(st.just("lit"), st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 5000])),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.none(),
    st.booleans(),
    st.text(max_size=10),
    st.just([]),
)
feature_maps = st.lists(
    st.tuples(mostly(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.text(max_size=8)),
              mostly(st.text(st.characters(codec="utf-8"), max_size=8), st.one_of(st.text(min_size=250, max_size=260), odd))),
    max_size=8,
).map(lambda pairs: ("obj", pairs))  # fmt: skip


@st.composite
def records(draw: st.DrawFn) -> tuple[bytes, str]:
    """A record near the contract: each field right or odd, pairs in any order, maybe a pair
    repeated (with the same or another value, at the top, in the features or deeper), maybe keys
    spelled with escapes, extra fields, padding."""
    etype = draw(st.sampled_from(STEPS))
    pairs: list[tuple[str, Any]] = [
        ("schema_version", draw(mostly(st.just(1), odd))),
        ("event_type", draw(mostly(st.just(etype), st.one_of(st.sampled_from(STEPS), odd)))),
        ("event_id", draw(mostly(plain_ids, st.one_of(ids, odd)))),
        ("impression_id", draw(mostly(plain_ids, st.one_of(ids, odd)))),
        ("event_time_ms", draw(mostly(st.integers(0, 2**53 - 1), st.one_of(st.integers(-5, 2**60), odd)))),
        ("bank_id", draw(mostly(plain_ids, st.one_of(ids, odd)))),
    ]
    if etype == "impression" or draw(st.integers(0, 4)) == 0:
        pairs.append(("features", draw(mostly(feature_maps, odd))))
    if draw(st.integers(0, 9)) == 0:  # an extra field, maybe an object with its own repeats
        nested = draw(feature_maps)
        if nested[1] and draw(st.booleans()):
            nested[1].append((nested[1][0][0], draw(odd)))
        pairs.append((draw(st.sampled_from(["extra", "features2", "Event_id"])), nested))
    if draw(st.integers(0, 5)) == 0 and len(pairs) > 1:  # a field missing
        pairs.pop(draw(st.integers(0, len(pairs) - 1)))
    pairs = draw(st.permutations(pairs))
    dup = draw(st.sampled_from(["none", "none", "none", "top", "features", "top-same"]))
    if dup.startswith("top"):
        k, v = pairs[draw(st.integers(0, len(pairs) - 1))]
        pairs.insert(draw(st.integers(0, len(pairs))), (k, v if dup == "top-same" else draw(odd)))
    elif dup == "features":
        for i, (k, v) in enumerate(pairs):
            if k == "features" and isinstance(v, tuple) and v[0] == "obj" and v[1]:
                fk, fv = v[1][draw(st.integers(0, len(v[1]) - 1))]
                v[1].insert(draw(st.integers(0, len(v[1]))), (fk, draw(st.one_of(st.just(fv), st.text(max_size=4)))))
                pairs[i] = (k, v)
    how = draw(st.sampled_from(["plain", "plain", "plain", "ascii", "all"]))
    key_how = draw(mostly(st.just({}), st.dictionaries(st.integers(0, 8), st.sampled_from(["ascii", "all"]), max_size=2)))
    text = _write(("obj", pairs), how, key_how)
    pad = draw(mostly(st.just(""), st.sampled_from([" ", "\n", "\t ", "\r"])))
    raw = (pad + text + pad).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 30)) == 0:
        raw = raw + b" " * (MAX_RECORD_BYTES + 1 - len(raw))  # just over the size limit
    return raw, draw(mostly(st.just(etype), st.sampled_from(STEPS)))


def _same(fast: Event | InvalidEvent, strict: Event | InvalidEvent) -> None:
    if isinstance(strict, InvalidEvent):
        assert isinstance(fast, InvalidEvent), f"fast accepted what strict refuses: {strict.message}"
        assert (fast.reason, fast.message) == (strict.reason, strict.message)
    else:
        assert fast == strict
        assert isinstance(fast, Event) and fast.features == strict.features
        assert list((fast.features or {}).items()) == list((strict.features or {}).items())  # same order


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(records(), min_size=1, max_size=5))
def test_fast_and_strict_decode_agree(batch: list[tuple[bytes, str]]) -> None:
    raws = [raw for raw, _ in batch]
    types = [etype for _, etype in batch]
    strict = parse_events_strict(raws, types)
    for raw, etype, got, want in zip(raws, types, parse_events(raws, types), strict, strict=True):
        _same(got, want)
        ev = fast_event(raw, etype)
        assert ev is None or ev == want  # what the fast path vouches for, the strict path accepts


CLICK = b'{"schema_version":1,"event_type":"click","event_id":"e","impression_id":"i","event_time_ms":5,"bank_id":"b"}'
IMP = (
    b'{"schema_version":1,"event_type":"impression","event_id":"e","impression_id":"i","event_time_ms":5,'
    b'"bank_id":"b","features":{"a":"1","b":"x:y"}}'
)


def test_well_formed_records_take_the_fast_path() -> None:
    """The agreement above is not won by standing aside: the records producers send are decoded
    by the fast path, in any field order and with non-ASCII text."""
    assert fast_event(CLICK, "click") == parse_events_strict([CLICK], ["click"])[0]
    imp = fast_event(IMP, "impression")
    assert imp is not None and imp.features == {"a": "1", "b": "x:y"}
    ev = Event(step=0, event_id="é-1", impression_id="日本", event_time_ms=7, bank_id="b",
               features={"ville": "Zürich", "k": ""})  # fmt: skip
    raw = json.dumps(ev.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()
    assert fast_event(raw, "impression") == ev
    assert fast_event(encode_event(ev), "impression") is None  # \\u escapes: the strict path's


def test_duplicates_in_any_spelling_and_depth_get_the_strict_reason() -> None:
    cases = [
        CLICK.replace(b'"bank_id":"b"', b'"bank_id":"b","bank_id":"b"'),  # the same pair twice
        CLICK.replace(b'"event_id":"e"', b'"event_id":"x","event_id":"e"'),
        CLICK.replace(b'"bank_id":"b"', b'"bank_id":"b","ba\\u006ek_id":"c"'),  # an escaped spelling
        CLICK.replace(b'"event_time_ms":5', b'"event_time_ms":4,"event_time_ms":5'),  # numbers only
        IMP.replace(b'"a":"1"', b'"a":"1","a":"1"'),  # in the feature map
        IMP.replace(b'"a":"1"', b'"\\u0061":"2","a":"1"'),
        IMP.replace(b'"features":', b'"features":{"a":"1"},"features":'),  # a whole map repeated
    ]
    for raw in cases:
        etype = "impression" if b"impression\"," in raw else "click"
        assert fast_event(raw, etype) is None
        got = parse_events([raw], [etype])[0]
        assert isinstance(got, InvalidEvent) and got.reason == MALFORMED_JSON and "duplicate key" in got.message


def test_nan_huge_numbers_and_sizes_get_the_strict_reason() -> None:
    for raw, words in [
        (CLICK.replace(b'"event_time_ms":5', b'"event_time_ms":NaN'), "NaN"),
        (CLICK.replace(b'"event_time_ms":5', b'"event_time_ms":Infinity'), "Infinity"),
        (CLICK.replace(b'"event_time_ms":5', b'"event_time_ms":1e400'), "event_time_ms"),
        (CLICK.replace(b'"event_time_ms":5', b'"event_time_ms":' + b"9" * 30), "out of range"),
        (CLICK.replace(b'"event_time_ms":5', b'"event_time_ms":' + b"9" * 5000), "not valid JSON"),
        (CLICK + b" " * MAX_RECORD_BYTES, "bytes; at most"),
        (CLICK.replace(b'"schema_version":1', b'"schema_version":true'), "schema_version"),
    ]:
        assert fast_event(raw, "click") is None
        got = parse_events([raw], ["click"])[0]
        assert isinstance(got, InvalidEvent) and words in got.message, (raw[:60], got)
        assert (got.reason, got.message) == (lambda s: (s.reason, s.message))(parse_events_strict([raw], ["click"])[0])
