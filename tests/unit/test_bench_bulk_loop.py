"""``python -m bench.bulk_loop``: its two figures come from real runs of the bulk loop and sender."""

from __future__ import annotations

import json
from pathlib import Path

from bench import bulk_loop


def test_bench_bulk_loop_times_the_loop_and_the_sender_and_writes_its_figures(tmp_path: Path) -> None:
    assert bulk_loop.bulk_loop_us(fetches=2, passes=1) > 0  # divides by the records handled: none would raise
    assert bulk_loop.sender_us(records=200, passes=1) > 0
    out = tmp_path / "b.json"
    assert bulk_loop.main(["--json", str(out)]) == 0
    assert set(json.loads(out.read_text())) == {"bulk_loop_us_per_record", "sender_us_per_record"}
