"""The Procfile under honcho, as a user runs it against an external Kafka: neither ``broker``
(not needed then) nor a finished simulator may end the run (honcho stops every process as soon
as one exits)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.supervisor import read_procfile
from stream.kafka.broker import EmbeddedBroker, free_port

ROOT = Path(__file__).resolve().parents[2]


def procfile_line(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.partition(":")[2].strip()
    raise AssertionError(f"no {name} in the Procfile")


def test_the_procfile_simulator_stays_up() -> None:
    assert "--stay" in read_procfile()["simulator"]


def test_honcho_keeps_running_after_broker_and_simulator_are_done(broker: EmbeddedBroker, tmp_path: Path) -> None:
    # the Procfile's own broker line; its simulator line with a short run (same flag that matters)
    procfile = tmp_path / "Procfile"
    sim = "aitm-stream simulate --days 1 --impressions-per-day 300 --speedup 0 --quiet --stay"
    assert procfile_line("simulator").startswith("aitm-stream simulate ") and "--stay" in procfile_line("simulator")
    procfile.write_text(f"broker: {procfile_line('broker')}\nsimulator: {sim}\n")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "TOPIC_IMPRESSIONS": "honcho-impressions",
        "METRICS_PORT_SIMULATOR": str(free_port()),
        "METRICS_PORT_BROKER": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path / "honcho.log"
    honcho = subprocess.Popen(
        [str(Path(sys.executable).parent / "honcho"), "start", "-f", str(procfile), "-d", str(tmp_path)],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "staying up until stopped" not in log.read_text():
            assert honcho.poll() is None, f"honcho ended the run:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        text = log.read_text()
        assert "no embedded broker needed" in text and "sent 3" in text  # both are done ...
        time.sleep(3)
        assert honcho.poll() is None, f"honcho ended the run:\n{log.read_text()[-3000:]}"  # ... and it runs on
        honcho.send_signal(signal.SIGINT)  # Ctrl-C: honcho stops both
        honcho.wait(timeout=30)
        final = log.read_text()
        assert "broker.1 stopped" in final and "simulator.1 stopped" in final
    finally:
        if honcho.poll() is None:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait()


def test_broker_idles_with_an_external_kafka_and_stops_cleanly() -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "broker"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "no embedded broker needed; idle until stopped" in proc.stdout.readline()
        time.sleep(1)
        assert proc.poll() is None  # still there: a supervisor does not see it exit
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    once = subprocess.run([sys.executable, "-m", "stream.cli", "broker", "--exit-if-external"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert once.returncode == 0
