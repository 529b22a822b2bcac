"""Ali-CCP replay on a tiny file written in the dataset's own format."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulators.replay import AliccpFormatError, aliccp_records, read_aliccp
from stream.contract.events import parse_event


def feats(pairs: list[tuple[str, str]]) -> str:
    return "\x01".join(f"{f}\x02{i}\x031.0" for f, i in pairs)


def write_tiny(d: Path) -> None:
    (d / "common_features_train.csv").write_text(
        f"md5a,2,{feats([('101', '11'), ('121', '7')])}\nmd5b,1,{feats([('101', '12')])}\n"
    )
    (d / "sample_skeleton_train.csv").write_text(
        f"1,1,0,md5a,2,{feats([('205', '900'), ('301', '2'), ('999', '5')])}\n"
        f"2,0,0,md5b,1,{feats([('205', '901')])}\n"
        f"3,0,1,md5a,1,{feats([('205', '902')])}\n"  # purchase without click: dropped
        f"4,1,1,md5b,1,{feats([('205', '903')])}\n"
    )


def test_rows_join_common_features_and_keep_the_18_fields(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    rows = list(read_aliccp(tmp_path / "sample_skeleton_train.csv", tmp_path / "common_features_train.csv"))
    assert [r.sample_id for r in rows] == ["1", "2", "4"]
    assert rows[0].features == {"101": "11", "121": "7", "205": "900", "301": "2"}  # 999 dropped
    assert (rows[2].click, rows[2].purchase) == (1, 1)


def test_replay_into_the_event_contract(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    rows = read_aliccp(tmp_path / "sample_skeleton_train.csv", tmp_path / "common_features_train.csv")
    recs = list(aliccp_records(rows, start_ms=1_000))
    steps = [(r.key.decode(), r.step) for r in recs]
    assert steps == [
        ("ccp-1", "impression"),
        ("ccp-1", "click"),
        ("ccp-2", "impression"),
        ("ccp-4", "impression"),
        ("ccp-4", "click"),
        ("ccp-4", "application"),
    ]
    events = [parse_event(r.value, r.step) for r in recs]
    assert events[0].features == {"101": "11", "121": "7", "205": "900", "301": "2"}
    assert all(e.event_time_ms == r.timestamp_ms for e, r in zip(events, recs, strict=True))


def test_bad_lines_say_where(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    (tmp_path / "sample_skeleton_train.csv").write_text("1,2,0,md5a,0,\n")
    with pytest.raises(AliccpFormatError, match=r"sample_skeleton_train.csv:1"):
        list(read_aliccp(tmp_path / "sample_skeleton_train.csv", tmp_path / "common_features_train.csv"))
