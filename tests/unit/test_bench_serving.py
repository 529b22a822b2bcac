"""``bench serving``'s figures from per-version scores: the judged versions, swing, percentiles."""

from __future__ import annotations

import doctest
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import bench.serving
import stream.learn.learner
import stream.learn.stabilisers
import stream.ops.jsonsafe
from bench.serving import VersionScore, figures
from simulators.faults import TruthRow
from simulators.funnel import DAY_MS, EPOCH_MS
from stream.ops.settings import Settings


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


def test_served_auc_judges_each_impressions_published_score_against_its_final_label(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def score(iid: str, p: float) -> SimpleNamespace:
        probs = {"click": p, "application": p / 2, "approval": 1 - p, "activation": 0.001}
        return SimpleNamespace(value=json.dumps({"impression_id": iid, "probabilities": probs}))

    def row(iid: str, at: int, final: tuple[int, ...] | None, tail: bool = False) -> TruthRow:
        return TruthRow(iid, "b", at, (0.1,) * 4, (0,) * 4, False, (), tail, final)

    # scored: a (twice: the last counts), b, c, d; e never scored; f before the warm-up; g in the tail
    recs = [score("a", 0.1), score("b", 0.2), score("a", 0.9), score("c", 0.3), score("d", 0.8),
            score("f", 0.0), score("g", 0.0)]
    truth = [row("a", 10, (1, 1, 0, 0)), row("b", 10, (0, 0, 1, 0)), row("c", 10, (0, 0, 1, 0)),
             row("d", 10, (1, 0, 0, 0)), row("e", 10, (1, 1, 1, 1)), row("f", 1, (1, 1, 1, 0)),
             row("g", 10, (1, 1, 1, 0), tail=True), row("h", 10, None)]
    monkeypatch.setattr(bench.serving, "read_topic", lambda settings, topic: recs)
    out = bench.serving._check_scores(Settings(), truth, since_ms=5)
    assert out["rows"] == 7 and out["served_auc_impressions"] == 4  # a, b, c, d
    assert out["served_auc"]["click"] == 1.0  # a 0.9 and d 0.8 clicked, b and c not
    assert out["served_auc"]["application"] == 1.0
    assert out["served_auc"]["approval"] == 1.0  # 1 - p: b and c highest
    assert out["served_auc"]["activation"] is None  # no positive among them: no AUC
    clicked = bench.serving._check_scores(Settings(), [truth[0], truth[3]], since_ms=5)  # a and d: all clicked
    assert clicked["served_auc"]["click"] is None and clicked["served_auc"]["approval"] is None
