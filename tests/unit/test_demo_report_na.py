"""The demo's tables show a step the data has no labels for as "n/a", aligned, never "nan"."""

from __future__ import annotations

import math

from bench.demo_report import fmt


def test_a_missing_step_reads_n_a_in_its_column() -> None:
    assert fmt(0.81234, ">8.4f") == "  0.8123"
    assert fmt(math.nan, ">8.4f") == "     n/a"  # same width as a number: the columns stay aligned
    assert fmt(math.nan, ".3f") == "n/a"
    assert "nan" not in fmt(float("nan"), ">11.4f")
