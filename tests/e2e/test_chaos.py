"""A smaller chaos run (the bench command itself): kill -9 the joiner, trainer and scorer while a
faulty stream flows; no final label lost, changed or duplicated, every impression scored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_chaos_loses_and_invents_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    r = subprocess.run(
        [sys.executable, "-m", "stream.cli", "bench", "chaos", "--days", "2", "--impressions-per-day", "8000",
         "--tail-days", "17", "--kills", "2", "--stream-seconds", "60", "--fault-rate", "0.01",
         "--json", str(out), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert result["kills"] == {"joiner": 2, "trainer": 2, "scorer": 2}
    assert result["restarts"] == {"joiner": 2, "trainer": 2, "scorer": 2}
    assert result["labels_checked"] > 15_000
    assert (result["labels_lost"], result["labels_wrong"], result["duplicate_finals"]) == (0, 0, 0), result[
        "examples"
    ]
    assert result["impressions_unscored"] == 0
    # every restart after the first checkpoint resumed from one
    assert result["trainer_resumed_from_checkpoint"] + result["trainer_cold_starts"] == 3
    assert result["trainer_resumed_from_checkpoint"] >= 1
    # the corrupted records are dead-lettered with their reasons
    assert sum(result["dead_letters"].values()) >= sum(
        n for kind, n in result["faults_injected"].items() if kind in ("malformed", "illegal", "late")
    )
