"""``python -m bench.bulk_loop``: its figures come from real runs of the bulk loop, the record
unpacking and the sender."""

from __future__ import annotations

import json
from pathlib import Path

from bench import bulk_loop


def test_bench_bulk_loop_times_the_loop_and_the_sender_and_writes_its_figures(tmp_path: Path) -> None:
    # each divides by the records handled: none would raise
    assert bulk_loop.bulk_loop_us(fetches=2, passes=1) > 0
    assert bulk_loop.bulk_loop_us(fetches=2, passes=1, one_record=True) > 0
    assert bulk_loop.unpack_us(batches=2, passes=1) > 0 and bulk_loop.unpack_us(batches=2, passes=1, lean=False) > 0
    assert bulk_loop.sender_us(records=200, passes=1) > 0 and bulk_loop.sender_us(records=200, passes=1, writer=False) > 0
    out = tmp_path / "b.json"
    assert bulk_loop.main(["--json", str(out)]) == 0
    assert set(json.loads(out.read_text())) == {
        "bulk_loop_us_per_record", "one_record_loop_us_per_record", "unpack_us_per_record",
        "aiokafka_unpack_us_per_record", "sender_us_per_record", "aiokafka_builder_sender_us_per_record",
    }  # fmt: skip
