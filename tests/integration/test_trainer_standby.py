"""Two trainers on one model store: the second waits as a standby, writes nothing, and takes over
when the active one is killed with ``kill -9`` - resuming from the newest version, numbering on
from it, and training on every sample exactly once across the two."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaProducer

from stream.contract.samples import encode_sample
from stream.kafka.broker import free_port
from stream.learn.learner import held_back
from stream.ops.model_store import ModelStore
from stream.ops.settings import Settings
from tests.integration.test_trainer_restart import env_for, make_samples


def lease_gauge(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            body = resp.read().decode()
    except OSError:
        return None
    for line in body.splitlines():
        if line.startswith("aitm_trainer_writer_lease "):
            return float(line.split()[1])
    return None


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(what + "\n" + "\n".join(p.read_text()[-2500:] for p in logs if p.exists()))
        time.sleep(0.1)


def test_standby_takes_over_after_kill_9(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(samples_partitions=4)
    samples = make_samples(6000)
    half = len(samples) // 2
    producer = KafkaProducer(**settings.kafka_python_config(), linger_ms=5)

    def produce(part: list) -> None:  # type: ignore[type-arg]
        for s in part:
            producer.send(settings.topic_samples, key=s.impression_id.encode(), value=encode_sample(s))
        producer.flush()

    produce(samples[:half])
    env = env_for(settings)
    store = ModelStore(settings.model_store_path())
    logs = [tmp_path / "active.log", tmp_path / "standby.log"]
    ports = [free_port(), free_port()]

    def trainer(i: int, *extra: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "stream.cli", "trainer", *extra]
        return subprocess.Popen(cmd, env={**env, "METRICS_PORT_TRAINER": str(ports[i])},
                                stdout=logs[i].open("ab"), stderr=subprocess.STDOUT)  # fmt: skip

    active = trainer(0)
    standby: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: len(store.versions()) >= 2, 120, "the active trainer published nothing", logs)
        assert lease_gauge(ports[0]) == 1.0
        standby = trainer(1, "--exit-when-idle", "5")
        wait_for(lambda: lease_gauge(ports[1]) == 0.0, 60, "the second trainer is not a standby", logs)
        wait_for(lambda: "standby: the writer lease" in logs[1].read_text(), 10, "no standby log line", logs)
        assert f"pid {active.pid} " in logs[1].read_text()  # it names the holder
        time.sleep(2)
        assert standby.poll() is None and "resumed from" not in logs[1].read_text()  # it read nothing

        active.send_signal(signal.SIGKILL)
        active.wait()
        before = store.versions()[-1]
        produce(samples[half:])
        wait_for(lambda: lease_gauge(ports[1]) == 1.0, 30, "the standby did not take over", logs)
        assert standby.wait(timeout=180) == 0, logs[1].read_text()[-3000:]
    finally:
        for proc in (active, standby):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    producer.close()

    text = logs[1].read_text()
    assert "took over the writer lease" in text
    assert f"resumed from model version {before}" in text
    v, ckpt = store.load_latest()  # type: ignore[misc]
    assert v > before  # numbering goes on from the dead writer's versions
    extra = ckpt["extra"]
    assert sum(extra["offsets"].values()) == len(samples)  # every record consumed across the two
    trained = [s for s in samples if not held_back([s.impression_id], settings.trainer_holdout_share)[0]]
    expected_rows = sum(1 + s.labels[0] for s in trained if s.kind == "first") + sum(
        1 for s in trained if s.kind == "correction"
    )
    mixer = extra["learner"]["mixer"]
    waiting = sum(len(b["ids"]) for b in mixer["ready"]) + sum(len(b["ids"]) for q in mixer["held"] for b in q)
    assert extra["learner"]["trained_samples"] + waiting == expected_rows  # trained on exactly once
