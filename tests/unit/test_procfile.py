"""The Procfile as the supervisor (and honcho, through a shell) reads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.supervisor import read_procfile


def test_leading_assignments_set_the_commands_environment(tmp_path: Path) -> None:
    proc = tmp_path / "Procfile"
    proc.write_text("# comment\nweb: A=1 B_2=\"x y\" aitm-stream joiner --flag\nplain: aitm-stream broker\n")
    got = read_procfile(proc)
    assert got["web"] == ["env", "A=1", "B_2=x y", sys.executable, "-m", "stream.cli", "joiner", "--flag"]
    assert got["plain"] == [sys.executable, "-m", "stream.cli", "broker"]
    out = subprocess.run([*got["web"][:3], sys.executable, "-c", "import os; print(os.environ['B_2'])"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "x y"


def test_the_simulated_pipeline_turns_the_future_check_off() -> None:
    """The Procfile's pipeline streams simulated time, which may run ahead of the wall clock."""
    assert read_procfile()["joiner"][:2] == ["env", "JOINER_MAX_FUTURE_MS=0"]
