"""The one settings object: environment names, client configs, secrets kept secret."""

from __future__ import annotations

import pytest

from stream.ops.settings import Settings, kafka_client_config


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("TOPIC_CLICKS", "prod.clicks")
    monkeypatch.setenv("EVENT_PARTITIONS", "12")
    s = Settings()
    assert s.bootstrap() == "kafka-1:9092,kafka-2:9092"
    assert s.event_topics()["click"] == "prod.clicks"
    assert {t.name: t.partitions for t in s.topic_specs()}["prod.clicks"] == 12


def test_unset_bootstrap_means_embedded_broker() -> None:
    s = Settings(embedded_broker_port=19999)
    assert s.kafka_bootstrap_servers is None
    assert s.bootstrap() == "127.0.0.1:19999"


def test_sasl_ssl_reaches_both_client_styles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k:9093")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2")
    s = Settings()
    for style in ("kafka-python", "aiokafka"):
        cfg = kafka_client_config(s, style)  # type: ignore[arg-type]
        assert cfg["security_protocol"] == "SASL_PLAINTEXT"
        assert cfg["sasl_mechanism"] == "SCRAM-SHA-512"
        assert cfg["sasl_plain_username"] == "svc"
        assert cfg["sasl_plain_password"] == "hunter2"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


def test_sasl_without_credentials_is_a_clear_error() -> None:
    s = Settings(kafka_bootstrap_servers="k:1", kafka_security_protocol="SASL_SSL")
    with pytest.raises(ValueError, match="KAFKA_SASL_USERNAME"):
        s.kafka_python_config()


def test_ssl_files_pass_through() -> None:
    s = Settings(kafka_bootstrap_servers="k:1", kafka_security_protocol="SSL", kafka_ssl_cafile="/etc/ca.pem")
    assert s.kafka_python_config()["ssl_cafile"] == "/etc/ca.pem"


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError):
        Settings(event_partitions=0)
    with pytest.raises(ValueError):
        Settings(kafka_security_protocol="TLS")  # type: ignore[arg-type]
