"""Start the Procfile's pipeline on free ports for end-to-end tests (the commands users run)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.supervisor import Supervisor, read_procfile, wait_http
from stream.kafka.broker import free_port

PORT_VARS = (
    "EMBEDDED_BROKER_PORT", "METRICS_PORT_BROKER", "METRICS_PORT_SIMULATOR", "METRICS_PORT_JOINER",
    "METRICS_PORT_TRAINER", "METRICS_PORT_SCORER", "SCORER_HTTP_PORT", "PROMETHEUS_PORT",
)  # fmt: skip


def pipeline_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update({k: str(free_port()) for k in PORT_VARS})
    env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{env['EMBEDDED_BROKER_PORT']}"
    env["DATA_DIR"] = str(data_dir)
    env["JOINER_RECOVERY_CONSISTENCY_CHECK"] = "false"  # the embedded broker (BROKER.md)
    return env


def start_pipeline(
    sup: Supervisor, names: tuple[str, ...] = ("joiner", "trainer", "scorer")
) -> dict[str, list[str]]:
    """Broker first (waits for its topics), then the named processes (waits for /metrics)."""
    procfile = read_procfile()
    env = sup.env
    sup.start("broker", procfile["broker"], {"KAFKA_BOOTSTRAP_SERVERS": ""})
    log = sup.log_dir / "broker.log"
    deadline = time.monotonic() + 30
    while "broker ready" not in (log.read_text() if log.exists() else ""):
        assert sup.alive("broker"), sup.tail("broker")
        assert time.monotonic() < deadline, "the broker did not get ready"
        time.sleep(0.2)
    for name in names:
        sup.start(name, procfile[name])
    for name in names:
        port = env[f"METRICS_PORT_{name.upper()}"] if name != "prometheus" else env["PROMETHEUS_PORT"]
        path = "/metrics" if name != "prometheus" else "/-/ready"
        wait_http(f"http://127.0.0.1:{port}{path}", 90, lambda n=name: sup.alive(n))  # type: ignore[misc]
    return procfile


def simulator_argv(procfile: dict[str, list[str]], *args: str) -> list[str]:
    return [*procfile["simulator"][:3], "simulate", *args]


def processes_with_env(marker: str) -> list[int]:
    """PIDs of live processes whose environment contains ``marker`` (e.g. DATA_DIR=...)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


EVIDENCE = ("WARNING", "ERROR", "Traceback", "revoked", "assigned", "states read from", "rebalance is not over")


def log_evidence(log_dir: Path, names: tuple[str, ...], lines: int = 80) -> str:
    """The lines of the named processes' logs that explain an ownership change (warnings,
    errors, revocations, assignments, partition loads: the joiner logs them at ``LOG_LEVEL=info``),
    the last ``lines`` of each: printed by a test before it fails, so a failure elsewhere (CI)
    says what the processes saw."""
    out = []
    for name in names:
        path = log_dir / f"{name}.log"
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        picked = [ln[:400] for ln in text if any(w in ln for w in EVIDENCE)]
        out.append(f"--- {name}: {len(picked)} of {len(text)} lines ---")
        out.extend(picked[-lines:])
    return "\n".join(out)
