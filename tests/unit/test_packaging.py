"""The built wheel carries what ``demo`` and ``prometheus`` read at run time (the Procfile, the
Prometheus configs and rules), so they work from an installed package with no repository beside."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_holds_the_procfile_and_prometheus_files_and_finds_them(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("aitm_stream-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    assert "stream/resources/Procfile" in names
    rules = sorted(p.name for p in (ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
    for rule in rules:
        assert f"stream/resources/prometheus/rules/{rule}" in names
    # copies, not links, with the repository's content
    assert (site / "stream/resources/Procfile").read_text() == (ROOT / "Procfile").read_text()
    assert not (site / "stream/resources/Procfile").is_symlink()
    # imported from the unpacked wheel, in a directory with no repository: the Procfile and the
    # rendered Prometheus config come from the package
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from bench.supervisor import read_procfile; from stream.ops import prometheus;"
        "from stream.ops.settings import Settings; import pathlib;"
        "assert prometheus.__file__.startswith(sys.argv[1]), prometheus.__file__;"
        "print(sorted(read_procfile()));"
        "cfg = prometheus.prepare(Settings(data_dir=pathlib.Path(sys.argv[2])));"
        "print(sorted(p.name for p in (cfg.parent / 'rules').iterdir()))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", probe, str(site), str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    procs, rendered = out.stdout.splitlines()
    assert procs == str(sorted(["broker", "simulator", "joiner", "trainer", "scorer", "prometheus"]))
    assert rendered == str(rules)
