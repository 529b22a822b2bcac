"""The faust joiner as a user runs it (``aitm-stream joiner``) on the embedded broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from simulators.kafka_sink import produce
from stream.kafka.broker import free_port
from stream.ops.settings import Settings
from tests.joinhelpers import Collected, check_against_truth, small_stream

TIMEOUT_S = 90


def _env(settings: Settings, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOPIC_", "JOINER_", "KAFKA_"))}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=settings.bootstrap(),
        DATA_DIR=str(settings.data_dir),
        METRICS_PORT_JOINER=str(port),
        JOINER_RECOVERY_CONSISTENCY_CHECK="false",
        JOINER_APP_ID=f"joiner-{settings.topic_samples}",
        JOINER_MAX_FUTURE_MS="0",  # simulated time may run ahead of the wall clock
        JOINER_IDLE_TIMEOUT_MS="3000",  # topics go idle soon after the stream ends
        **{f"TOPIC_{n.upper()}": getattr(settings, f"topic_{n}") for n in (
            "impressions", "clicks", "applications", "approvals", "activations", "samples", "dead_letters")},
    )
    return env


def _topics(settings: Settings) -> tuple[str, ...]:
    return tuple(settings.event_topics().values())


def _start(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "stream.cli", "joiner"],
        env=_env(settings, free_port()),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )


def _collect(settings: Settings, got: Collected, until: Callable[[], bool], proc: subprocess.Popen[bytes],
             consumer: KafkaConsumer, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not until():
        assert proc.poll() is None, f"the joiner exited with {proc.returncode}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out; joiner log: {log.read_text()[-3000:]}"
        for msgs in consumer.poll(300).values():
            for m in msgs:
                got.add(m.topic, m.value, settings.topic_samples)


@pytest.mark.parametrize("delivery", ["realtime", "batch-feeds"])
def test_joiner_labels_equal_truth_and_faults_are_dead_lettered(make_settings, tmp_path: Path, delivery: str) -> None:
    """The whole stream is produced first: the joiner reads a backlog (topics read at similar
    record rates, so far apart in event time) and must still meet the answer key."""
    settings = make_settings()
    stream = small_stream(delivery=delivery)
    produce(stream, settings)
    want = {r.impression_id for r in stream.truth if r.final_required}
    n_expected = len({(d.impression_id, d.step, d.reason) for d in stream.dead_letters if d.required})
    consumer = KafkaConsumer(settings.topic_samples, settings.topic_dead_letters, auto_offset_reset="earliest",
                             **settings.kafka_python_config())
    log = tmp_path / "joiner.log"
    proc = _start(settings, log)
    got = Collected()
    try:
        _collect(settings, got, lambda: want <= set(got.finals()) and len(got.dead) >= n_expected, proc, consumer, log)
    finally:
        proc.terminate()
        proc.wait(30)
        consumer.close()
    check_against_truth(stream, got, _topics(settings))
    assert got.repeated_finals() == 0


def test_kill_9_and_restart_loses_and_changes_no_final_label(make_settings, tmp_path: Path) -> None:
    settings = make_settings()
    stream = small_stream(seed=2)
    records = list(stream)
    half = len(records) // 2
    produce(records[:half], settings)
    want = {r.impression_id for r in stream.truth if r.final_required}
    consumer = KafkaConsumer(settings.topic_samples, settings.topic_dead_letters, auto_offset_reset="earliest",
                             **settings.kafka_python_config())
    log = tmp_path / "joiner.log"
    got = Collected()
    proc = _start(settings, log)
    try:
        # mid-stream: once some finals are out, produce the rest and kill -9 while it works
        _collect(settings, got, lambda: len(got.finals()) > 500, proc, consumer, log)
        produce(records[half:], settings)
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        finals_before = dict(got.finals())
        proc = _start(settings, log)
        _collect(settings, got, lambda: want <= set(got.finals()), proc, consumer, log)
        time.sleep(2.0)  # let any replayed duplicates arrive too
        for msgs in consumer.poll(1000).values():
            for m in msgs:
                got.add(m.topic, m.value, settings.topic_samples)
    finally:
        proc.terminate()
        proc.wait(30)
        consumer.close()
    finals = got.finals()  # raises if two finals of one impression disagree
    for iid, s in finals_before.items():
        assert finals[iid].labels == s.labels
    check_against_truth(stream, got, _topics(settings))
