"""Samples as columns: built from samples or from validated records, taken, joined, and back."""

from __future__ import annotations

import numpy as np
import pytest

from aitm.features import FeatureEncoder
from stream.contract.samples import Sample, encode_sample, parse_sample, validate_sample
from stream.learn.feed import parse_chunk
from stream.learn.sample_batch import FINAL, FIRST, SampleBatch

ALL = (True, True, True, True)


def s(i: int, kind: str = "first", feats: dict[str, str] | None = None) -> Sample:
    return Sample(f"imp-{i}", f"bank_{i % 3}", 1_000 * i, feats if feats is not None else {"a": str(i), "b": "x"},
                  (1, i % 2, 0, 0), (True, False, bool(i % 2), False), kind, 60_000 + i,  # type: ignore[arg-type]
                  {"first": 0, "correction": 1, "final": 5}[kind], watermark_ms=7 * i)


def test_columns_hold_every_field_and_round_trip_to_samples() -> None:
    samples = [s(0), s(1, "correction"), s(2, "final", {"a": "q"}), s(3, "final", {"c": "z", "a": "w"})]
    b = SampleBatch.from_samples(samples)
    assert len(b) == 4
    assert b.features == {"a": ["0", "1", "q", "w"], "b": ["x", "x", "", ""], "c": ["", "", "", "z"]}
    assert b.kind.tolist() == [FIRST, 1, FINAL, FINAL]
    assert b.labels.tolist()[1] == [1, 1, 0, 0] and b.mature.dtype == bool
    assert [b.sample(i) for i in range(4)] == samples
    assert b.kind_counts() == {"first": 1, "correction": 1, "final": 2}


def test_validated_records_give_the_same_columns_as_parsed_samples() -> None:
    samples = [s(i, ("first", "correction", "final")[i % 3]) for i in range(30)] + [s(99, "final", {"a": "1"})]
    raw = [encode_sample(x) for x in samples]
    a = SampleBatch.from_samples([parse_sample(r) for r in raw])
    b = SampleBatch.from_valid([validate_sample(r) for r in raw])
    assert a.features == b.features and a.impression_ids == b.impression_ids and a.bank_ids == b.bank_ids
    for name in ("event_time_ms", "kind", "seq", "labels", "mature", "elapsed_ms", "watermark_ms"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_take_and_concat() -> None:
    x = SampleBatch.from_samples([s(0), s(1), s(2)])
    y = SampleBatch.from_samples([s(3, "final", {"c": "k"})])
    t = x.take([2, 0])
    assert t.impression_ids == ["imp-2", "imp-0"] and t.event_time_ms.tolist() == [2000, 0]
    assert t.features == {"a": ["2", "0"], "b": ["x", "x"]}
    j = SampleBatch.concat([x, SampleBatch.empty(), y])
    assert j.impression_ids == ["imp-0", "imp-1", "imp-2", "imp-3"]
    assert j.features == {"a": ["0", "1", "2", ""], "b": ["x", "x", "x", ""], "c": ["", "", "", "k"]}
    assert [j.sample(i) for i in range(4)] == [s(0), s(1), s(2), s(3, "final", {"c": "k"})]
    assert len(SampleBatch.concat([])) == 0


def test_encoder_columns_match_dicts() -> None:
    samples = [s(i, feats={"a": str(i % 4), "b": "x"} if i % 5 else {"a": "7"}) for i in range(50)]
    b = SampleBatch.from_samples(samples)
    e1 = FeatureEncoder(("a", "b", "missing"), capacity=6, min_count=2)
    e2 = FeatureEncoder(("a", "b", "missing"), capacity=6, min_count=2)
    for _ in range(2):  # counts, then admits
        got = e1.encode_columns(b.features, len(b), update=True)
        want = e2.encode_dicts([x.features for x in samples], update=True)
        np.testing.assert_array_equal(got, want)
    assert e1.vocab == e2.vocab
    with pytest.raises(ValueError, match="1 values, expected 3"):
        e1.encode_columns({"a": ["1"]}, 3)


class Rec:
    def __init__(self, offset: int, value: bytes, partition: int = 0) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = "samples", partition, offset, b"k", value


class TP:
    def __init__(self, partition: int) -> None:
        self.partition = partition


def test_a_chunk_keeps_good_samples_and_refuses_bad_ones_with_a_reason() -> None:
    good = [encode_sample(s(i)) for i in range(3)]
    polled = {TP(0): [Rec(10, good[0]), Rec(11, b"{not json"), Rec(12, good[1])],
              TP(1): [Rec(4, good[2], 1), Rec(5, b'{"schema_version": 9}', 1)]}
    chunk = parse_chunk(polled, fetched_at_s=1.5)
    assert chunk.samples.impression_ids == ["imp-0", "imp-1", "imp-2"]
    assert [(r.partition, r.offset, r.reason) for r in chunk.invalid] == [
        (0, 11, "malformed_json"), (1, 5, "unsupported_schema")]
    assert chunk.offsets == {0: 13, 1: 6}
    assert len(chunk) == 5 and chunk.kinds == {"first": 3} and chunk.fetched_at_s == 1.5
