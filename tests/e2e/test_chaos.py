"""A smaller chaos run (the bench command itself): kill -9 the joiner, trainer and scorer while a
faulty stream flows, delivered as partners do (hourly approval and daily activation files); no
final label lost, changed or duplicated, every dead letter the answer key expects and no other,
repeated finals only where a kill explains them, every impression scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.pipeline import log_evidence


def test_chaos_loses_and_invents_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    r = subprocess.run(
        [sys.executable, "-m", "stream.cli", "bench", "chaos", "--days", "2", "--impressions-per-day", "8000",
         "--tail-days", "21", "--kills", "2", "--stream-seconds", "70", "--fault-rate", "0.01",
         "--delivery", "batch-feeds", "--json", str(out), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "LOG_LEVEL": "info"},
    )  # fmt: skip
    result = json.loads(out.read_text())
    if r.returncode != 0:  # what failed first, then the evidence: the answer key's examples, the joiner's log
        checks = {k: v for k, v in result.items() if k.startswith(("labels_", "dead_letters_", "duplicate_", "repeated_",
                                                                     "impressions_unscored"))}  # fmt: skip
        print(json.dumps(checks), json.dumps(result["examples"]), r.stderr[-2000:], sep="\n")
        print(log_evidence(tmp_path / "data" / "logs", ("joiner",)))
    assert r.returncode == 0, "bench chaos failed its checks (printed above)"
    assert result["kills"] == {"joiner": 2, "trainer": 2, "scorer": 2}
    assert result["restarts"] == {"joiner": 2, "trainer": 2, "scorer": 2}
    assert result["labels_checked"] > 15_000
    assert (result["labels_lost"], result["labels_wrong"], result["duplicate_finals"]) == (0, 0, 0), result[
        "examples"
    ]
    assert result["finals_without_impression"] == 0
    # the run's logs are kept beside its figures (the next run's start empties the data dir)
    assert (Path(result["logs_kept_in"]) / "joiner.log").stat().st_size > 0
    assert result["impressions_unscored"] == 0
    # every restart after the first checkpoint resumed from one
    assert result["trainer_resumed_from_checkpoint"] + result["trainer_cold_starts"] == 3
    assert result["trainer_resumed_from_checkpoint"] >= 1
    # the dead letters are exactly the answer key's (per reason), none missing, none unexplained
    expected = result["dead_letters_expected"]
    assert result["dead_letters_missing"] == 0 and result["dead_letters_missing_by_reason"] == {}
    assert result["dead_letters_unexplained"] == 0 and result["dead_letters_unexplained_by_reason"] == {}
    assert set(result["dead_letters"]) == set(expected)
    assert all(result["dead_letters"][reason] >= n for reason, n in expected.items())
    for reason in ("late", "illegal_sequence", "malformed_json"):
        assert expected.get(reason, 0) > 0, reason
    # finals re-emitted after a kill -9 are identical (no conflict above), and each follows a kill
    # of the joiner: what was in flight then; without a kill the count is 0 (the in-process tests)
    assert result["repeated_finals_without_a_kill"] == 0
    assert result["repeated_finals"] <= 0.05 * result["labels_checked"]
    # the delay of a final after its funnel's last possible event is reported per lane; at
    # real-time pace (the same records in process, event time = wall time) a final waits about
    # its topic's allowed lateness: never less, and not much more
    assert result["final_delay_s"]["n"] == result["labels_checked"]
    assert set(result["final_delay_s"]["by_lane"]) >= {"clicks", "applications"}
    realtime = result["final_delay_realtime_s"]["by_lane"]
    hour = 3600.0
    for lane, lateness_h in (("clicks", 0.5), ("applications", 6), ("activations", 48)):
        assert lateness_h * hour <= realtime[lane]["p50"] <= (lateness_h + 1) * hour, (lane, realtime[lane])
