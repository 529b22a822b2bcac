"""The demo in a short mode: exits 0, leaves no process behind, writes a report that renders."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.pipeline import processes_with_env


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    out = tmp_path_factory.mktemp("demo")
    report, data = out / "demo.html", out / "data"
    r = subprocess.run(
        [sys.executable, "-m", "stream.cli", "demo", "--days", "3", "--impressions-per-day", "4000",
         "--minutes", "0.75", "--report", str(report), "--data-dir", str(data), "--drain-timeout", "30"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return r, report, data


def test_demo_exits_cleanly_with_a_summary(demo_run) -> None:  # type: ignore[no-untyped-def]
    r, _, data = demo_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for task in ("click", "application", "approval", "activation"):
        assert task in r.stdout
    assert "samples trained" in r.stdout and "scores published" in r.stdout
    assert "sim day" in r.stdout  # the live progress line
    assert not processes_with_env(f"DATA_DIR={data.resolve()}"), "the demo left processes running"


def test_report_renders_in_headless_chromium(demo_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, report, _ = demo_run
    page = report.read_text()
    assert page.count("<img") >= 3 and "Summary" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is missing: `make test` installs Debian's chromium"
    shot = tmp_path / "report.png"
    r = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400", f"--screenshot={shot}",
         report.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] >= 2000 and pixels.std() > 0.05  # not a blank page
