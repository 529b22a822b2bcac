"""Security: SASL/TLS settings reach every client, endpoints bind loopback, no secret is logged."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream.join.app import _faust_broker_kwargs
from stream.kafka.broker import EmbeddedBroker, free_port
from stream.ops.settings import Settings

SECRET = "s3cr3t-hunter2-zz"


def sasl_settings(**kw: object) -> Settings:
    return Settings(
        kafka_bootstrap_servers="k1:9093,k2:9093", kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="svc-aitm", kafka_sasl_password=SECRET,
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_sasl_ssl_reaches_the_faust_joiner() -> None:
    kw = _faust_broker_kwargs(sasl_settings())
    assert kw["broker"] == "kafka://k1:9093;kafka://k2:9093"
    creds = kw["broker_credentials"]
    assert creds.username == "svc-aitm" and creds.password == SECRET
    assert creds.mechanism.value == "SCRAM-SHA-512"
    assert creds.ssl_context is not None  # TLS under SASL_SSL


def test_sasl_ssl_reaches_the_kafka_python_clients() -> None:
    # the trainer, scorer, simulator, broker admin and topic readers all build clients from this
    cfg = sasl_settings(kafka_ssl_cafile="/etc/ssl/certs/ca-certificates.crt").kafka_python_config()
    assert cfg["security_protocol"] == "SASL_SSL"
    assert cfg["sasl_mechanism"] == "SCRAM-SHA-512"
    assert cfg["sasl_plain_username"] == "svc-aitm" and cfg["sasl_plain_password"] == SECRET
    assert cfg["ssl_cafile"] == "/etc/ssl/certs/ca-certificates.crt"
    from kafka import KafkaConsumer, KafkaProducer

    # kafka-python accepts every key (an unknown one would raise here)
    for cls in (KafkaProducer, KafkaConsumer):
        unknown = set(cfg) - set(cls.DEFAULT_CONFIG)
        assert not unknown, (cls.__name__, unknown)


def test_every_process_uses_the_one_config_builder() -> None:
    root = Path(__file__).resolve().parents[2]
    for path in [*root.joinpath("stream").glob("*.py"), *root.joinpath("simulators").glob("*.py")]:
        text = path.read_text()
        for client in ("KafkaProducer(", "KafkaConsumer(", "KafkaAdminClient("):
            for chunk in text.split(client)[1:]:
                call = chunk[:400]
                assert "config" in call or "**cfg" in call or "**client_config" in call, (path.name, client)


def test_endpoints_default_to_loopback() -> None:
    s = Settings()
    assert s.metrics_host == "127.0.0.1" and s.scorer_http_host == "127.0.0.1"


def _listening(port: int) -> set[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if int(hexport, 16) == port and state == "0A":  # LISTEN
                found.add(addr)
    return found


def test_running_scorer_binds_loopback_and_logs_no_secret(broker: EmbeddedBroker, tmp_path: Path) -> None:
    metrics_port, http_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "METRICS_", "SCORER_"))},
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "DATA_DIR": str(tmp_path),
        "METRICS_PORT_SCORER": str(metrics_port), "SCORER_HTTP_PORT": str(http_port),
        # a password that must never show up, even though this broker speaks no SASL
        "KAFKA_SASL_PASSWORD": SECRET,
    }  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream.cli", "scorer"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (_listening(metrics_port) and _listening(http_port)):
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.3)
        assert _listening(metrics_port) == {"0100007F"}  # 127.0.0.1 only
        assert _listening(http_port) == {"0100007F"}
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert SECRET not in out


@pytest.mark.parametrize("command", ["simulate", "trainer"])
def test_sasl_failure_does_not_log_the_password(broker: EmbeddedBroker, tmp_path: Path, command: str) -> None:
    # the simulator against a closed port (fails fast), the trainer against a broker without SASL
    bootstrap = f"127.0.0.1:{free_port()}" if command == "simulate" else broker.bootstrap
    env = {
        **os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATA_DIR": str(tmp_path),
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN",
        "KAFKA_SASL_USERNAME": "svc", "KAFKA_SASL_PASSWORD": SECRET,
        "METRICS_PORT_SIMULATOR": str(free_port()), "METRICS_PORT_TRAINER": str(free_port()),
    }  # fmt: skip
    args = (
        ["simulate", "--days", "1", "--impressions-per-day", "10", "--quiet"]
        if command == "simulate"
        else ["trainer"]
    )
    timeout = 60 if command == "simulate" else 25
    try:
        r = subprocess.run(
            [sys.executable, "-m", "stream.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired as exc:  # still retrying: what it printed so far counts
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
    assert SECRET not in out
    assert out  # it said something about the failure
    if command == "simulate":
        assert "error: cannot produce to Kafka" in out and "Traceback" not in out
