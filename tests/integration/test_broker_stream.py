"""A simulated day through the real broker: every topic read back, by kafka-python and by kcat."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from simulators.faults import FaultConfig, SimulatedStream
from simulators.funnel import FunnelSimulator, SimConfig
from simulators.kafka_sink import produce
from stream.ops.settings import Settings


def read_all(settings: Settings, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    consumer = KafkaConsumer(**settings.kafka_python_config(), consumer_timeout_ms=2_000)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    out: list = []
    import time

    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            out.extend(batch)
    consumer.close()
    return out


@pytest.fixture(scope="module")
def streamed(broker, tmp_path_factory) -> tuple[Settings, SimulatedStream, Counter[str]]:  # type: ignore[no-untyped-def]
    from stream.kafka.broker import ensure_topics

    settings = Settings(kafka_bootstrap_servers=broker.bootstrap, topic_impressions="it-impressions",
                        topic_clicks="it-clicks", topic_applications="it-applications",
                        topic_approvals="it-approvals", topic_activations="it-activations")  # fmt: skip
    ensure_topics(settings.kafka_python_config(), settings.topic_specs())
    sim = FunnelSimulator(SimConfig(seed=21, impressions_per_day=4_000))
    stream = SimulatedStream(sim, days=1, faults=FaultConfig.uniform(0.01))
    records = list(stream)
    counts = Counter(produce(records, settings))
    return settings, stream, counts


def test_every_topic_reads_back_complete(streamed) -> None:  # type: ignore[no-untyped-def]
    settings, stream, counts = streamed
    sent = Counter(settings.event_topics()[r.step] for r in stream)
    assert counts == sent
    for step, topic in settings.event_topics().items():
        got = read_all(settings, topic, sent[topic])
        assert len(got) == sent[topic], topic
        assert all(m.key is not None and m.timestamp > 0 for m in got)
        expected_values = sorted(r.value for r in stream if r.step == step)
        assert sorted(m.value for m in got) == expected_values
        # keyed by impression id: one impression's events share a partition number
        parts = {m.key: m.partition for m in got}
        assert len(parts) == len({m.key for m in got})


def current_librdkafka(tmp: Path) -> dict[str, str]:
    """Environment that makes Debian's kcat load the librdkafka shipped in confluent-kafka's wheel.

    Debian bookworm's librdkafka 2.0.2 misreads the (spec-conformant) tagged fields of Tansu's
    ApiVersions v3 response ("Read underflow"); librdkafka >= 2.3 reads them fine.
    """
    import confluent_kafka

    libs = sorted(
        (Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs").glob("librdkafka*.so*")
    )
    assert libs, "confluent-kafka's wheel ships no librdkafka"
    (tmp / "librdkafka.so.1").symlink_to(libs[0])
    return {**os.environ, "LD_LIBRARY_PATH": str(tmp)}


def test_kcat_reads_the_same_records(streamed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, stream, _ = streamed
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    assert kcat, "kcat is not installed: `make test` installs it (Debian package kcat)"
    topic = settings.topic_clicks
    out = subprocess.run(
        [kcat, "-b", settings.bootstrap(), "-C", "-t", topic, "-e", "-q", "-f", "%k\t%T\t%s\n"],
        capture_output=True, timeout=60, check=True, env=current_librdkafka(tmp_path),
    )  # fmt: skip
    lines = [ln for ln in out.stdout.split(b"\n") if ln]
    ours = sorted((r.key, r.timestamp_ms, r.value) for r in stream if r.step == "click")
    theirs = sorted((k, int(ts), v) for k, ts, v in (ln.split(b"\t", 2) for ln in lines))
    assert len(theirs) == len(ours)
    assert theirs == ours
