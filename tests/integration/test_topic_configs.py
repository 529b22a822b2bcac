"""Topics are created with their configs: ``model-versions`` compacted (checked on the embedded
broker, which accepts and describes the config; Apache Kafka also applies it)."""

from __future__ import annotations

from collections.abc import Callable

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient

from stream.kafka.broker import ensure_topics, topic_configs
from stream.ops.settings import Settings


def test_model_versions_topic_is_created_compacted(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()  # ensure_topics ran, as every process does at start-up
    admin = KafkaAdminClient(**settings.kafka_python_config())
    try:
        assert topic_configs(admin, settings.topic_model_versions).get("cleanup.policy") == "compact"
        # the event topics keep the broker's default (delete), not compaction
        assert topic_configs(admin, settings.topic_impressions).get("cleanup.policy") != "compact"
    finally:
        admin.close()
    # announcements are keyed, as a compacted topic requires
    producer = KafkaProducer(**settings.kafka_python_config())
    producer.send(settings.topic_model_versions, key=b"model", value=b"{}").get(timeout=10)
    producer.close()


def test_an_existing_topic_with_other_configs_is_reported_not_changed(
    make_settings: Callable[..., Settings], caplog: object
) -> None:
    import logging

    settings = make_settings(topic_model_versions="mv-plain-" + str(id(caplog)))
    admin = KafkaAdminClient(**settings.kafka_python_config())
    try:
        admin.delete_topics([settings.topic_model_versions])
    finally:
        admin.close()
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(**settings.kafka_python_config())
    try:
        admin.create_topics([NewTopic(settings.topic_model_versions, 1, 1)])
    finally:
        admin.close()
    with caplog.at_level(logging.WARNING, logger="stream.kafka.broker"):  # type: ignore[attr-defined]
        ensure_topics(settings.kafka_python_config(), settings.topic_specs())
    assert "expected compact" in caplog.text  # type: ignore[attr-defined]
