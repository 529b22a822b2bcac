"""deploy/: the compose file against the official Compose Specification schema (vendored; neither
``docker compose`` nor compose-go installs here), and what the issue found wrong in it, in the
Dockerfile and in the Grafana provisioning. Docker itself is not available: nothing is built."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
AITM = ("simulator", "joiner", "trainer", "scorer")


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def validator() -> jsonschema.Draft7Validator:
    schema = json.loads((DEPLOY / "vendor" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    errors = sorted(validator().iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["services"]["kafka"]["healthcheck"].update(intervall="5s"),  # a misspelt key
        lambda d: d["services"]["scorer"]["healthcheck"].update(test=5),  # a test that is no command
        lambda d: d["services"]["joiner"].update(depends_on={"kafka": {"condition": "service_happy"}}),
        lambda d: d.update(volumes=["models"]),  # volumes is a mapping
    ],
)
def test_the_validator_rejects_broken_files(break_it: Any) -> None:
    doc = copy.deepcopy(compose())
    break_it(doc)
    assert list(validator().iter_errors(doc)), "a broken compose file passed: the validation is not real"


def test_every_service_has_a_healthcheck_and_the_pipeline_waits_for_a_healthy_kafka() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in AITM:
        assert services[name]["depends_on"]["kafka"]["condition"] == "service_healthy"
        env = services[name]["environment"]
        if name == "scorer":  # its own HTTP endpoint's liveness (readiness is for the load balancer)
            assert env["HEALTH_URL"] == f"http://127.0.0.1:{env['SCORER_HTTP_PORT']}/livez"
            continue
        port = re.search(r":(\d+)/metrics$", env["HEALTH_URL"])
        assert port and port.group(1) == env[f"METRICS_PORT_{name.upper()}"]


def test_kafka_data_lives_on_its_volume() -> None:
    kafka = compose()["services"]["kafka"]
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
    mounts = {v.split(":")[1] for v in kafka["volumes"]}
    assert log_dirs in mounts  # configured by env only, Kafka would write /tmp/kafka-logs otherwise


def test_simulator_is_a_one_shot_job() -> None:
    sim = compose()["services"]["simulator"]
    assert sim["restart"] == "no"
    assert "--stay" not in sim["command"]


def test_scaled_services_share_no_state_and_no_host_port() -> None:
    services = compose()["services"]
    # each joiner replica its own RocksDB directory: an anonymous volume, never a named one
    for v in services["joiner"].get("volumes", []):
        assert ":" not in v, f"joiner mounts a shared volume: {v}"
    # each scorer replica its own host port: a range, not one fixed port
    (port,) = services["scorer"]["ports"]
    host = port.rsplit(":", 1)[0]
    assert re.search(r":\d+-\d+$", host), port


def test_scorer_reads_the_models_volume_root_which_exists_before_the_trainer_writes() -> None:
    services = compose()["services"]
    store = services["scorer"]["environment"]["MODEL_STORE_DIR"]
    assert f"models:{store}:ro" in services["scorer"]["volumes"]
    assert f"models:{store}" in services["trainer"]["volumes"]


def test_prometheus_scrapes_every_replica() -> None:
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-compose.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    for name in AITM:
        assert jobs[name]["dns_sd_configs"][0]["names"] == [name]


def test_grafana_provisioning_sets_url_and_uid_from_the_environment() -> None:
    text = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert ":-" not in text  # Grafana does not expand shell defaults
    assert not re.search(r"\$\{\w+:", text)
    (ds,) = yaml.safe_load(text)["datasources"]
    variables = re.findall(r"\$\{(\w+)\}", json.dumps(ds))
    env = compose()["services"]["grafana"]["environment"]
    for var in variables:
        assert env.get(var), f"{var} is not set for grafana in docker-compose.yml"
    assert ds["url"] == "${PROMETHEUS_URL}" and ds["uid"] == "${GRAFANA_DATASOURCE_UID}"


def test_dashboard_picks_its_datasource_through_a_variable() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "aitm-funnel.json").read_text())
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    ref = "${" + var["name"] + "}"
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == ref, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ref, panel["title"]


def test_dockerfile_runs_as_a_user_with_a_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*CMD \[\"aitm-stream\", \"health\"\]", text, re.M)
    assert "constraints.txt" in text  # the same pins as `make install`
    # the joiner's compiled path is built into the wheel: setup.py in the build context, a compiler there
    assert re.search(r"^COPY .*\bsetup\.py\b", text, re.M) and re.search(r"apt-get install .*\bgcc\b", text)


def test_dockerignore_keeps_state_and_venv_out_of_the_build_context() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".data", ".git", "reports"} <= patterns


def test_dashboard_json_is_what_its_code_generates() -> None:
    """The dashboard is built by deploy/grafana/dashboard.py (grafana-foundation-sdk): the JSON
    Grafana provisions must be exactly its output (`make dashboards` rewrites it)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(DEPLOY / "grafana" / "dashboard.py"), "--check"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
