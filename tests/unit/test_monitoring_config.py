"""Prometheus config, rules and alerts pass the real promtool; metric names follow conventions."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from stream.ops import metrics as metrics_module
from stream.ops.prometheus import prepare
from stream.ops.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: `make test` installs Debian's prometheus package"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.mark.parametrize("config", ["prometheus/prometheus.yml", "prometheus/prometheus-compose.yml"])
def test_configs_pass_promtool(config: str) -> None:
    r = promtool("check", "config", str(DEPLOY / config))
    assert r.returncode == 0, r.stdout + r.stderr


def test_rendered_config_passes_promtool(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, metrics_port_joiner=19402)
    config = prepare(settings, scrape_interval_s=1.0)
    assert "127.0.0.1:19402" in config.read_text()
    r = promtool("check", "config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr


def test_rules_pass_promtool() -> None:
    rules = sorted(str(p) for p in (DEPLOY / "prometheus" / "rules").glob("*.yml"))
    assert len(rules) == 2
    r = promtool("check", "rules", *rules)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alerts_fire_on_the_series_that_should_fire_them() -> None:
    r = promtool("test", "rules", "tests/alerts_test.yml", cwd=DEPLOY / "prometheus")
    assert r.returncode == 0, r.stdout + r.stderr


def all_metric_families() -> list:  # type: ignore[type-arg]
    registry = CollectorRegistry()
    for cls in (
        metrics_module.JoinerMetrics, metrics_module.TrainerMetrics, metrics_module.ScorerMetrics,
        metrics_module.SimulatorMetrics, metrics_module.BrokerMetrics,
    ):  # fmt: skip
        cls(registry)
    for process in ("trainer", "scorer"):
        metrics_module.RefreshMetrics(registry, process, lambda: 0.0)
    return list(registry.collect())


def test_metric_names_follow_prometheus_conventions() -> None:
    families = all_metric_families()
    assert len(families) > 30
    for fam in families:
        assert fam.name.startswith("aitm_"), fam.name
        for sample in fam.samples:
            assert not any(lbl.endswith("id") for lbl in sample.labels), (fam.name, sample.labels)
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), fam.name
        if "ratio" in fam.name or "auc" in fam.name:
            assert fam.name.endswith("_ratio"), fam.name


def test_dashboard_queries_only_name_metrics_that_exist() -> None:
    import re

    known = {f.name for f in all_metric_families()} | {"up"}
    recorded = {r["record"] for g in _rules()["groups"] for r in g["rules"] if "record" in r}
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "aitm-funnel.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in _rules()["groups"] for r in g["rules"]]
    for expr in exprs:
        for name in re.findall(r"\b(aitm[:_][a-z0-9_:]+)", expr):
            base = re.sub(r"_(bucket|count|sum|total)$", "", name)
            assert name in recorded or base in known or name in known, (name, expr)


def _rules() -> dict:  # type: ignore[type-arg]
    import yaml

    out: dict = {"groups": []}  # type: ignore[type-arg]
    for path in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml")):
        out["groups"] += yaml.safe_load(path.read_text())["groups"]
    return out
