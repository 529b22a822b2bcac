"""The samples topic's two encodings: JSON (v1) and binary MessagePack (v2) decode to the same
columns, a feed reads them mixed, the joiner writes what it is told, and bad binary records are
refused with a reason."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.contract.samples import (
    KINDS,
    InvalidSample,
    Sample,
    decode_record,
    decode_records,
    encode_binary,
    encode_sample,
    is_binary,
    parse_sample,
    sample_binary,
    sample_bytes,
    validate_sample,
)
from stream.join.funnel import features_json
from stream.learn.feed import parse_chunk
from stream.learn.sample_batch import SampleBatch

ARRAYS = ("event_time_ms", "kind", "seq", "labels", "mature", "elapsed_ms", "watermark_ms")
FEATS = {"user_id": "28687", "user_city": "333", "slot": "2", "creative_id": "273"}


def s(i: int, kind: str = "first", feats: dict[str, str] | None = None) -> Sample:
    return Sample(f"imp-{i}", f"bank_{i % 3}", 1_000 * i, FEATS if feats is None else feats,
                  (1, i % 2, 0, 0), (True, False, bool(i % 2), False), kind, 60_000 + i,  # type: ignore[arg-type]
                  {"first": 0, "correction": 1, "final": 5}[kind], watermark_ms=7 * i, policy="early")


def assert_same(a: SampleBatch, b: SampleBatch) -> None:
    assert a.impression_ids == b.impression_ids and a.bank_ids == b.bank_ids
    assert a.features == b.features
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(a, name).dtype == getattr(b, name).dtype, name


class Rec:
    def __init__(self, offset: int, value: bytes | None, partition: int = 0) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = "samples", partition, offset, None, value


class TP:
    def __init__(self, partition: int) -> None:
        self.partition = partition


def chunk_of(values: list[bytes | None]) -> Any:
    return parse_chunk({TP(0): [Rec(i, v) for i, v in enumerate(values)]})


def enc(*items: Any) -> bytes:
    return msgspec.msgpack.encode(items)


GOOD = (2, "imp", "bank_1", 5, ("a", "b"), ("1", "2"), 0b0001_0010, 0, 1, 0, 9, "early")  # labels 0100, click mature


def test_binary_is_smaller_and_told_apart_from_json_by_its_first_byte() -> None:
    x = s(3, "final")
    j, b = encode_sample(x), encode_binary(x)
    assert b[:2] == b"\x9c\x02"  # fixarray of 12 items, then the version
    assert is_binary(b) and not is_binary(j) and not is_binary(b"")
    assert len(b) < 0.6 * len(j)
    assert parse_sample(b) == parse_sample(j) == x
    assert validate_sample(b) == validate_sample(j) | {"schema_version": 2}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(max_size=12), st.text(max_size=8), st.integers(-(2**62), 2**62),
            st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4),
            st.tuples(*[st.integers(0, 1)] * 4), st.tuples(*[st.booleans()] * 4), st.sampled_from(KINDS),
            st.integers(0, 2**40), st.integers(0, 5), st.integers(0, 2**45), st.sampled_from(["early", "matured"]),
        ),
        min_size=1, max_size=12,
    )
)  # fmt: skip
def test_both_encodings_round_trip_to_identical_columns(rows: list[tuple[Any, ...]]) -> None:
    samples = [Sample(*r) for r in rows]
    from_json = chunk_of([encode_sample(x) for x in samples])
    from_binary = chunk_of([encode_binary(x) for x in samples])
    assert not from_json.invalid and not from_binary.invalid
    assert_same(from_json.samples, from_binary.samples)
    assert_same(from_binary.samples, SampleBatch.from_samples(samples))
    assert [parse_sample(encode_binary(x)) for x in samples] == samples


def test_a_feed_reads_a_mixed_stream_of_old_and_new_records_in_order() -> None:
    samples = [s(i, KINDS[i % 3]) for i in range(40)] + [s(40, "final", {"other": "v"}), s(41, "first", {})]
    mixed = [encode_binary(x) if i % 3 else encode_sample(x) for i, x in enumerate(samples)]
    chunk = chunk_of(list(mixed))
    assert not chunk.invalid
    assert_same(chunk.samples, SampleBatch.from_samples(samples))
    assert chunk.samples.features["other"][-2:] == ["v", ""] and chunk.samples.features["user_id"][-2:] == ["", ""]
    assert chunk.kinds == SampleBatch.from_samples(samples).kind_counts()


def test_binary_records_with_different_field_lists_fill_missing_fields_like_json() -> None:
    samples = [s(0), s(1, feats={"a": "1"}), s(2, feats={"user_id": "7", "a": "2"}), s(3)]
    assert_same(chunk_of([encode_binary(x) for x in samples]).samples, chunk_of([encode_sample(x) for x in samples]).samples)


def test_the_joiners_writer_is_encode_binary_byte_for_byte() -> None:
    for i, kind in enumerate(KINDS):
        x = s(i, kind, {"b": "é", "a": '"q"'})
        args = (x.impression_id, x.bank_id, x.event_time_ms, features_json(x.features), x.labels, x.mature, x.kind,
                x.elapsed_ms, x.seq, x.watermark_ms, x.policy)
        assert sample_binary(*args) == encode_binary(x)
        assert parse_sample(sample_binary(*args)) == parse_sample(sample_bytes(*args))


BAD = [
    (enc(*GOOD)[:-4], "malformed_msgpack", "not valid MessagePack"),
    (enc(*GOOD) + b"\x00", "malformed_msgpack", "trailing"),
    (b"\x9c", "malformed_msgpack", "truncated"),
    (enc(3, *GOOD[1:]), "unsupported_schema", "schema_version 3"),
    (enc(9, "x"), "unsupported_schema", "schema_version 9"),
    (enc(*GOOD[:3]), "missing_field", "'event_time_ms' is missing"),
    (enc(*GOOD[:4], ("a",), ("1", "2"), *GOOD[6:]), "invalid_field", "names and values differ"),
    (enc(*GOOD[:4], ("a", "a"), ("1", "2"), *GOOD[6:]), "invalid_field", "appears twice"),
    (enc(*GOOD[:4], ("a", 7), ("1", "2"), *GOOD[6:]), "invalid_field", "array of strings"),
    (enc(*GOOD[:5], ("1", 2), *GOOD[6:]), "invalid_field", "$.values[1]"),
    (enc(*GOOD[:6], 256, *GOOD[7:]), "invalid_field", "$.flags"),
    (enc(*GOOD[:6], -1, *GOOD[7:]), "invalid_field", "$.flags"),
    (enc(*GOOD[:6], [0, 1, 0, 0], *GOOD[7:]), "invalid_field", "$.flags"),
    (enc(*GOOD[:7], 3, *GOOD[8:]), "invalid_field", "$.kind"),
    (enc(*GOOD[:7], "first", *GOOD[8:]), "invalid_field", "$.kind"),
    (enc(*GOOD[:3], True, *GOOD[4:]), "invalid_field", "$.event_time_ms"),
    (enc(*GOOD[:3], "5", *GOOD[4:]), "invalid_field", "$.event_time_ms"),
    (enc(*GOOD[:1], 17, *GOOD[2:]), "invalid_field", "$.impression_id"),
    (enc(*GOOD[:11], None), "invalid_field", "$.policy"),
    (b"\x9c\x02\xc1", "malformed_msgpack", "not valid MessagePack"),
    (b"\x9c\x02\xa2\x00\x80", "malformed_msgpack", "not valid MessagePack"),  # a string that is not UTF-8
    (enc(*GOOD).replace(b"\x92\xa1a\xa1b", b"\x92\xa1a\xa1\x80"), "invalid_field", "array of strings"),  # name not UTF-8
]


@pytest.mark.parametrize(("raw", "reason", "says"), BAD, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(BAD)])
def test_malformed_binary_records_are_refused_with_a_clear_reason(raw: bytes, reason: str, says: str) -> None:
    assert is_binary(raw)
    with pytest.raises(InvalidSample) as err:
        decode_record(raw)
    assert (err.value.reason, says in err.value.message) == (reason, True), err.value.message
    with pytest.raises(InvalidSample):
        parse_sample(raw)


def test_a_chunk_keeps_the_good_records_around_bad_binary_ones() -> None:
    good = enc(*GOOD)
    values: list[bytes | None] = [good, BAD[0][0], good, None, encode_sample(s(1)), BAD[10][0], good]
    chunk = chunk_of(values)
    assert chunk.samples.impression_ids == ["imp", "imp", "imp-1", "imp"]
    assert [(r.offset, r.reason) for r in chunk.invalid] == [
        (1, "malformed_msgpack"), (3, "malformed_json"), (5, "invalid_field")]
    assert chunk.offsets == {0: 7}


def test_a_later_writer_may_append_items_an_older_reader_skips() -> None:
    r = decode_record(msgspec.msgpack.encode((*GOOD, "a field from the future")))
    assert r.features == {"a": "1", "b": "2"} and r.policy == "early"
    assert r.sample().labels == (0, 1, 0, 0) and r.sample().mature == (True, False, False, False)


def test_decode_records_fast_path_and_slow_path_agree() -> None:
    samples = [s(i, KINDS[i % 3]) for i in range(10)]
    fast, none = decode_records([encode_binary(x) for x in samples])
    slow, _ = decode_records([encode_binary(x) for x in samples] + [b"{"])
    assert none == [] and fast == slow


def test_bench_feed_reports_both_encodings_under_the_issue_keys(tmp_path: Any) -> None:
    import json

    from bench.feed import main

    out = tmp_path / "feed.json"
    assert main(["--json", str(out), "--samples", "1500", "--repeats", "1", "--chunk", "200"]) == 0
    report = json.loads(out.read_text())
    for enc in ("json", "msgpack"):
        got = report["encodings"][enc]
        assert got["feed_samples_per_s"] > 0 and got["bytes_per_sample"] > 100
    assert report["encodings"]["msgpack"]["bytes_per_sample"] < report["encodings"]["json"]["bytes_per_sample"]
    assert report["same_columns"] is True and report["feed_speedup"] > 0


def test_a_sample_the_binary_form_cannot_carry_goes_out_as_json() -> None:
    odd = s(1, "final", {"a": "\udc80", "b": "ok"})  # a lone surrogate: valid in JSON's escapes, not UTF-8
    args = (odd.impression_id, odd.bank_id, odd.event_time_ms, features_json(odd.features), odd.labels, odd.mature,
            odd.kind, odd.elapsed_ms, odd.seq, odd.watermark_ms, odd.policy)
    raw = sample_binary(*args)
    assert not is_binary(raw) and raw == sample_bytes(*args)
    assert parse_sample(raw) == odd
    assert is_binary(sample_binary(*args[:3], features_json({"a": "x"}), *args[4:]))
