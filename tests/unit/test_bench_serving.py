"""``bench serving``'s figures from per-version scores: the judged versions, swing, percentiles."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import bench.serving
import stream.learn.learner
import stream.learn.stabilisers
import stream.ops.jsonsafe
from bench.serving import VersionScore, figures
from simulators.funnel import DAY_MS, EPOCH_MS


def version(v: int, day: float | None, mean: list[float], cal: list[float], non_monotone: float = 0.0) -> VersionScore:
    ms = None if day is None else EPOCH_MS + int(day * DAY_MS)
    return VersionScore(v, ms, mean, cal, non_monotone, non_monotone, [0.8] * 4, cal)


def test_doctests() -> None:
    assert doctest.testmod(bench.serving).failed == 0
    assert doctest.testmod(stream.learn.stabilisers).attempted >= 2
    assert doctest.testmod(stream.learn.stabilisers).failed == 0
    assert doctest.testmod(stream.ops.jsonsafe).failed == 0


def test_figures_judge_versions_past_the_warm_up_and_every_version_for_the_order() -> None:
    scores = [
        version(1, 0.5, [0.5, 0.5, 0.5, 0.5], [2.0, 30.0, 40.0, 50.0], non_monotone=1.0),  # warm-up
        version(2, 2.5, [0.2, 0.02, 0.01, 0.008], [0.9, 1.0, 1.0, 0.8]),
        version(3, 3.0, [0.22, 0.02, 0.012, 0.004], [1.0, 1.0, 1.2, 0.4]),
        version(4, 20.0, [0.2, 0.02, 0.01, 0.008], [0.9, 1.0, 1.0, 0.8], non_monotone=0.001),  # the tail
    ]
    f = figures(scores, EPOCH_MS + 2 * DAY_MS)
    assert f["versions"] == 4 and f["versions_judged"] == 3
    assert f["swing"]["activation"] == pytest.approx(2.0)  # 0.008 -> 0.004 -> 0.008
    assert f["swing"]["approval"] == pytest.approx(1.2)
    assert f["calibration"]["activation"]["p50"] == pytest.approx(0.8)
    assert f["calibration"]["click"]["p95"] <= 1.0  # the warm-up version's 2.0 is not judged
    assert f["non_monotone_share"]["max"] == 1.0  # ... but its rows out of order count
    assert f["last_version_calibration"]["activation"] == pytest.approx(0.8)


def test_a_run_without_keep_leaves_no_working_directory_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a live run's two profiles leave ~2.3 GB of logs, stores and samples: gone at the end, also
    # when the run fails; --keep keeps them
    work = tmp_path / "work"

    def mkdtemp(prefix: str = "") -> str:
        work.mkdir()
        (work / "realtime").mkdir()
        return str(work)

    monkeypatch.setattr(bench.serving.tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(FileNotFoundError):
        bench.serving.main(["--replay", str(tmp_path / "no-such-run"), "--profiles", "realtime",
                      "--json", str(tmp_path / "out.json")])
    assert not work.exists()
