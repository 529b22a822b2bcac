"""The foundation's commands as a user runs them: broker, simulate to files, simulate to Kafka."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stream.kafka.broker import EmbeddedBroker, free_port

CLI = [sys.executable, "-m", "stream.cli"]


def test_simulate_writes_events_and_truth(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    r = subprocess.run(
        [*CLI, "simulate", "--days", "1", "--impressions-per-day", "3000", "--fault-rate", "0.01", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for name in ("events.ndjson", "truth.ndjson", "faults.ndjson", "meta.json"):
        assert (out / name).stat().st_size > 0, name
    truth = [json.loads(line) for line in (out / "truth.ndjson").open()]
    assert len(truth) == 3000
    assert all(t["labels"] == sorted(t["labels"], reverse=True) for t in truth)
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["oracle_auc"]) == {"click", "application", "approval", "activation"}
    assert all(0.5 < v < 1 for v in meta["oracle_auc"].values())
    events = (out / "events.ndjson").read_text().splitlines()
    assert f"sent {len(events)} records" in r.stdout


def test_broker_command_starts_and_stops_cleanly() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "broker", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**{k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"},
             "METRICS_PORT_BROKER": str(free_port())},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and "broker ready" not in line:
            line = proc.stdout.readline()
        assert f"KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{port}" in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # nothing is left listening on the port
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_simulate_streams_to_kafka_with_counts(broker: EmbeddedBroker) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "TOPIC_IMPRESSIONS": "cli-impressions"}
    r = subprocess.run(
        [*CLI, "simulate", "--days", "1", "--impressions-per-day", "1000", "--speedup", "0", "--no-metrics"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "cli-impressions" in r.stdout and "1000" in r.stdout
    assert "sim day" in r.stderr  # the progress display
