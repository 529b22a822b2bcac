"""The feed's partition merge: a backlog is handed over in stream-time order (the joiner's
watermark, ties by partition), the same whatever the fetch timing, without changing a partition's
own order, holding back nothing for a caught-up partition, and never moving a resume offset past
a record not yet handed over."""

from __future__ import annotations

import random
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.contract.samples import Sample, encode_binary
from stream.learn.partition_merge import PartitionMerge


class Rec(NamedTuple):
    """A consumer record as aiokafka gives it (the fields the merge reads)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def _rec(p: int, offset: int, watermark_ms: int) -> Rec:
    s = Sample(f"p{p}-o{offset}", "bank_1", watermark_ms, {"a": "x"}, (0, 0, 0, 0), (False,) * 4, "first",  # type: ignore[arg-type]
               0, 0, watermark_ms)
    return Rec("samples", p, offset, None, encode_binary(s))


def _ids(merge: PartitionMerge, limit: int, waiting: list[int]) -> list[str]:
    got = merge.take(limit, waiting)
    return [] if got is None else got.samples.impression_ids


def test_a_backlog_fetched_a_partition_at_a_time_comes_out_by_stream_time() -> None:
    """What aiokafka gives during a backlog: all of partition 0's fetch, then partition 1's. The
    merge hands them over interleaved by watermark, and waits for a partition still behind."""
    merge = PartitionMerge([0, 1], capacity=100)
    merge.add(0, [_rec(0, o, 10 * o) for o in range(6)])  # times 0, 10, .., 50
    # partition 1 has records on the broker, none fetched yet: nothing may go out
    assert merge.take(6, waiting=[1]) is None
    merge.add(1, [_rec(1, o, 10 * o + 5) for o in range(3)])  # times 5, 15, 25; more to come
    assert merge.take(7, waiting=[1]) is None  # behind: whole chunks only (the same batches every run)
    assert _ids(merge, 6, waiting=[1]) == ["p0-o0", "p1-o0", "p0-o1", "p1-o1", "p0-o2", "p1-o2"]
    merge.add(1, [_rec(1, 3, 35)])  # partition 1 now caught up: nothing holds partition 0 back
    assert _ids(merge, 100, waiting=[]) == ["p0-o3", "p1-o3", "p0-o4", "p0-o5"]


def test_ties_go_to_the_lower_partition_and_a_partitions_order_is_kept() -> None:
    merge = PartitionMerge([0, 1], capacity=100)
    merge.add(1, [_rec(1, 0, 7), _rec(1, 1, 3)])  # a watermark that went back: order kept (running max)
    merge.add(0, [_rec(0, 0, 7), _rec(0, 1, 8)])
    assert _ids(merge, 100, waiting=[]) == ["p0-o0", "p1-o0", "p1-o1", "p0-o1"]


def test_a_lane_waits_for_a_lower_partition_at_the_same_time() -> None:
    """Partition 0 (waiting, at time 7) may still send a record at 7, which goes before partition
    1's record at 7: that one waits; partition 2's record at 6 does not."""
    merge = PartitionMerge([0, 1, 2], capacity=100)
    merge.add(0, [_rec(0, 0, 7)])
    merge.add(1, [_rec(1, 0, 7)])
    merge.add(2, [_rec(2, 0, 6)])
    assert _ids(merge, 2, waiting=[0]) == ["p2-o0", "p0-o0"]
    assert _ids(merge, 100, waiting=[]) == ["p1-o0"]


def test_refused_records_and_resume_offsets() -> None:
    merge = PartitionMerge([0, 1], capacity=100)
    bad = Rec("samples", 0, 2, b"k", b"{broken")
    merge.add(0, [_rec(0, 0, 1), _rec(0, 1, 2), bad, _rec(0, 3, 30)])
    merge.add(1, [_rec(1, 0, 20)])
    got = merge.take(2, waiting=[1])  # partition 1 may bring times after 20: 0-3 waits
    assert got is not None
    assert got.samples.impression_ids == ["p0-o0", "p0-o1"] and not got.refused
    assert got.offsets == {0: 2}  # never past a record not yet handed over
    # the refused record goes at its place in the stream (the time of the record before it)
    got = merge.take(2, waiting=[1])
    assert got is not None
    assert [(r.record.offset, r.reason) for r in got.refused] == [(2, "malformed_json")]
    assert got.samples.impression_ids == ["p1-o0"] and got.offsets == {0: 3, 1: 1}
    got = merge.take(10, waiting=[])
    assert got is not None and got.samples.impression_ids == ["p0-o3"] and got.offsets == {0: 4}
    assert merge.take(10, waiting=[]) is None


def test_a_lane_only_of_refused_records_is_handed_over_at_once() -> None:
    merge = PartitionMerge([0, 1], capacity=100)
    merge.add(0, [Rec("samples", 0, 5, None, b"{broken")])
    got = merge.take(1, waiting=[1])  # even while another partition is behind
    assert got is not None and len(got.samples) == 0
    assert [r.reason for r in got.refused] == ["malformed_json"] and got.offsets == {0: 6}


def test_room_caps_a_lane() -> None:
    merge = PartitionMerge([0], capacity=3)
    merge.add(0, [_rec(0, o, o) for o in range(2)])
    assert merge.room(0) == 1
    with pytest.raises(ValueError, match="capacity"):
        PartitionMerge([0], capacity=0)
    with pytest.raises(ValueError, match="capacity"):  # a lane must hold a whole chunk
        merge.take(4, waiting=[])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 40))
def test_any_fetch_timing_gives_the_one_stream_time_order(seed: int, limit: int) -> None:
    """Partitions of interleaved, non-decreasing watermarks (with ties), fetched in blocks of
    random sizes in random partition order - as fetches complete - and taken in chunks of
    ``limit``: the records always come out in the order of (watermark, partition, offset), and
    each resume offset is the next record not yet handed over."""
    rng = random.Random(seed)
    n_parts = rng.randint(1, 4)
    log = {p: [_rec(p, o, t) if rng.random() > 0.1 else Rec("samples", p, o, None, b"{broken")
               for o, t in enumerate(sorted(rng.randrange(0, 60) for _ in range(rng.randint(0, 40))))]
           for p in range(n_parts)}
    good = [r for rs in log.values() for r in rs if r.value != b"{broken"]
    want = [r.value for r in sorted(good, key=lambda r: (_watermark(r), r.partition, r.offset))]
    refused: list[tuple[int, int]] = []
    merge = PartitionMerge(range(n_parts), capacity=rng.randint(limit, 3 * limit))
    fetched = dict.fromkeys(log, 0)
    got: list[str] = []
    resume = dict.fromkeys(log, 0)
    for _ in range(10_000):
        behind = [p for p in log if fetched[p] < len(log[p])]
        if behind and rng.random() < 0.6:
            p = rng.choice(behind)
            n = min(rng.randint(1, 15), merge.room(p))
            if n > 0:
                merge.add(p, log[p][fetched[p] : fetched[p] + n])
                fetched[p] += n
        waiting = [p for p in log if fetched[p] < len(log[p])]
        out = merge.take(limit, waiting)
        if out is not None:
            assert len(out.samples) <= limit
            assert len(out.samples) + len(out.refused) <= limit
            if waiting:  # whole chunks while a partition is behind
                assert len(out.samples) + len(out.refused) == limit
            got += out.samples.impression_ids
            refused += [(r.record.partition, r.record.offset) for r in out.refused]
            for r in out.refused:  # handed over before its partition's resume offset passes it
                assert out.offsets[r.record.partition] > r.record.offset >= resume[r.record.partition]
            for p, o in out.offsets.items():
                assert o >= resume[p]
                resume[p] = o
        if len(got) + len(refused) == sum(map(len, log.values())) and not behind:
            break
    assert got == [_iid(v) for v in want]
    assert sorted(refused) == [(r.partition, r.offset) for rs in log.values() for r in rs if r.value == b"{broken"]
    assert resume == {p: len(rs) for p, rs in log.items() if rs} | {p: 0 for p, rs in log.items() if not rs}


def _watermark(r: Rec) -> int:
    from stream.contract.samples import decode_record

    assert r.value is not None
    return decode_record(r.value).watermark_ms


def _iid(v: bytes | None) -> str:
    from stream.contract.samples import decode_record

    assert v is not None
    return decode_record(v).impression_id
