"""Every Grafana panel query and every recording rule returns data from the real Prometheus
scraping a running pipeline (Grafana itself is not installable here)."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from bench.supervisor import Supervisor
from tests.e2e.pipeline import pipeline_env, simulator_argv, start_pipeline

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def query(port: str, expr: str) -> list:  # type: ignore[type-arg]
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def panel_queries() -> list[tuple[str, str]]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "aitm-funnel.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def recording_rules() -> list[tuple[str, str]]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "recording.yml").read_text())
    return [(r["record"], r["record"]) for g in doc["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def prometheus_port(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    data = tmp_path_factory.mktemp("dash")
    env = pipeline_env(data)
    with Supervisor(env, data / "logs") as sup:
        procfile = start_pipeline(sup)
        sup.start("prometheus", [*procfile["prometheus"], "--scrape-interval", "1"])
        sim = simulator_argv(
            procfile, "--days", "2", "--impressions-per-day", "3000", "--speedup", "5000",
            "--fault-rate", "0.01", "--quiet",
        )  # fmt: skip
        sup.start("simulator", sim)
        deadline = time.monotonic() + 240
        port = env["PROMETHEUS_PORT"]
        # wait until the trainer has published AUC and the scorer a model version
        while time.monotonic() < deadline:
            try:
                if query(port, "aitm:trainer_auc:sliding") and query(port, "aitm_scorer_model_version > 0"):
                    break
            except OSError:
                pass
            for name in ("joiner", "trainer", "scorer", "prometheus"):
                assert sup.alive(name), f"{name} died:\n{sup.tail(name)}"
            time.sleep(2)
        time.sleep(8)  # a few more scrapes so every rate() window holds two samples
        yield port


@pytest.mark.parametrize(("title", "expr"), panel_queries() + recording_rules())
def test_query_returns_data(prometheus_port: str, title: str, expr: str) -> None:
    result = query(prometheus_port, expr)
    assert result, f"{title}: {expr} returned no data"


def test_every_process_serves_process_and_gc_collectors(prometheus_port: str) -> None:
    """process_* and python_gc_* from every scraped process, as the real Prometheus sees them."""
    for metric in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_gc_collections_total"):
        jobs = {r["metric"]["job"] for r in query(prometheus_port, f"count by (job) ({metric})")}
        assert {"broker", "joiner", "trainer", "scorer"} <= jobs, (metric, jobs)
