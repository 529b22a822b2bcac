"""The trainer process on the embedded broker: kill -9, a corrupted newest checkpoint, and resume.

The restarted trainer must refuse the corrupted version, resume from the previous one and its
offsets, and train again on every sample after it: the final version's lineage has trained on
each sample exactly once (its row count, plus the rows still waiting in its mixing buffer, equals
a single uninterrupted pass over the impressions outside the held-back slice) and its offsets
cover every record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from kafka import KafkaProducer

from stream.contract.samples import Sample, encode_sample
from stream.learn.learner import held_back
from stream.ops.model_store import ModelStore
from stream.ops.settings import Settings

N_IMPRESSIONS = 6000
N_MALFORMED = 3


def make_samples(n: int) -> list[Sample]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        feats = {f"f{j}": str(int(rng.integers(0, 30))) for j in range(6)}
        click = int(rng.random() < 0.3)
        app = click * int(rng.random() < 0.3)
        first = (click, 0, 0, 0)
        final = (click, app, 0, 0)
        iid = f"imp-{i}"
        out.append(Sample(iid, "bank_1", i, feats, first, (bool(click), False, False, False), "first", 1800000, 0))
        if app:
            out.append(Sample(iid, "bank_1", i, feats, final, (True, True, False, False), "correction", 2000000, 2))
        out.append(Sample(iid, "bank_1", i, feats, final, (True,) * 4, "final", 3600000, 5))
    return out


def env_for(settings: Settings) -> dict[str, str]:
    env = {k.upper(): str(v) for k, v in settings.model_dump().items() if k.startswith("topic_") and isinstance(v, str)}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=settings.bootstrap(),
        DATA_DIR=str(settings.data_dir),
        TRAINER_MODE="fnw",
        TRAINER_BATCH_SIZE="200",
        TRAINER_LINGER_MS="100",
        TRAINER_CHECKPOINT_BATCHES="3",
        TRAINER_CHECKPOINT_INTERVAL_MS="600000",
        TRAINER_TRAINING_CHECKPOINT_INTERVAL_MS="0",  # a training checkpoint with every version here
        TRAINER_FEATURE_MIN_COUNT="1",
        TRAINER_EMBEDDING_ROWS="256",
        TRAINER_THREADS="1",
        MODEL_STORE_KEEP="1000",
        MODEL_STORE_KEEP_CHECKPOINTS="1000",
    )
    return {**os.environ, **env}


def produce_with_malformed(settings: Settings, samples: list[Sample]) -> None:
    """``samples`` onto the samples topic, keyed by impression, then N_MALFORMED broken records
    (they go to dead letters; the trainer keeps going)."""
    producer = KafkaProducer(**settings.kafka_python_config(), linger_ms=5)
    for s in samples:
        producer.send(settings.topic_samples, key=s.impression_id.encode(), value=encode_sample(s))
    for i in range(N_MALFORMED):
        producer.send(settings.topic_samples, key=f"bad-{i}".encode(), value=b'{"schema_version": 1, "kind"')
    producer.flush()
    producer.close()


def trainer(env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "stream.cli", "trainer", "--no-metrics", *extra]
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_kill_9_then_resume_from_the_last_good_checkpoint(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(samples_partitions=4)
    samples = make_samples(N_IMPRESSIONS)
    produce_with_malformed(settings, samples)
    total_records = len(samples) + N_MALFORMED
    # the held-back slice (a hash of the impression id) is never trained on
    trained = [s for s in samples if not held_back([s.impression_id], settings.trainer_holdout_share)[0]]
    assert len(trained) < len(samples)
    # fnw, by the rule (stream/learn/delayed_feedback.py): each first sample is one fake negative, plus
    # a positive copy when it already has a click; each correction (seq 2, application positive)
    # one row; finals are not trained (their first sample came before them)
    expected_rows = sum(1 + s.labels[0] for s in trained if s.kind == "first") + sum(
        1 for s in trained if s.kind == "correction"
    )

    env = env_for(settings)
    log = tmp_path / "trainer.log"
    store = ModelStore(settings.model_store_path())
    first = trainer(env, log)
    deadline = time.monotonic() + 60
    while len(store.versions()) < 2 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    versions = store.versions()
    assert len(versions) >= 2, log.read_text()[-3000:]
    newest = store.path_of(versions[-1])
    data = bytearray(newest.read_bytes())
    data[-1000] ^= 0xFF  # the newest checkpoint is damaged on disk
    newest.write_bytes(bytes(data))

    summary_path = tmp_path / "summary.json"
    second = trainer(env, log, "--exit-when-idle", "3", "--summary-json", str(summary_path))
    assert second.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"skipping model version {versions[-1]}" in text
    assert f"resumed from model version {versions[-2]}" in text
    summary = json.loads(summary_path.read_text())
    assert summary["dead_letters"] == N_MALFORMED

    v, ckpt = store.load_latest()  # type: ignore[misc]
    assert v > versions[-1]  # numbering moves past the damaged version, never overwrites it
    extra = ckpt["extra"]
    assert sum(extra["offsets"].values()) == total_records  # every record consumed ...
    mixer = extra["learner"]["mixer"]  # rows not in a step yet wait in the checkpointed mixing buffer
    waiting = sum(len(b["ids"]) for b in mixer["ready"]) + sum(len(b["ids"]) for q in mixer["held"] for b in q)
    assert extra["learner"]["trained_samples"] + waiting == expected_rows  # ... and trained on exactly once
    n_finals = sum(s.kind == "final" for s in samples)
    assert summary["quality"]["lifetime"][0]["count"] == n_finals  # each final evaluated once


def test_kill_9_resumes_from_a_training_checkpoint_older_than_the_last_version(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Training checkpoints at their own (slow) cadence: a trainer killed after announcing versions
    past its last training checkpoint is resumed from that checkpoint's offsets (the samples after
    it trained again, each exactly once in the final lineage), and numbers on past every version
    announced; its first version is a full serving snapshot."""
    from bench.topic_reader import read_topic
    from stream.contract.versions import parse_version

    settings = make_settings(samples_partitions=4)
    samples = make_samples(N_IMPRESSIONS)
    half = len(samples) // 2
    producer = KafkaProducer(**settings.kafka_python_config(), linger_ms=5)

    def send(part: list[Sample]) -> None:
        for s in part:
            producer.send(settings.topic_samples, key=s.impression_id.encode(), value=encode_sample(s))
        producer.flush()

    trained = [s for s in samples if not held_back([s.impression_id], settings.trainer_holdout_share)[0]]
    expected_rows = sum(1 + s.labels[0] for s in trained if s.kind == "first") + sum(
        1 for s in trained if s.kind == "correction"
    )
    env = {**env_for(settings), "TRAINER_TRAINING_CHECKPOINT_INTERVAL_MS": "600000"}
    log = tmp_path / "trainer.log"
    store = ModelStore(settings.model_store_path())
    send(samples[:half])
    first = trainer(env, log, "--exit-when-idle", "2")  # a clean stop: its training checkpoint
    assert first.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert len(store.versions()) == 1, log.read_text()[-3000:]
    ckpt_version = store.versions()[0]
    ckpt_offsets = store.load(ckpt_version)["extra"]["offsets"]
    assert 0 < sum(ckpt_offsets.values()) <= half

    send(samples[half:])
    producer.close()
    second = trainer(env, log)
    deadline = time.monotonic() + 90
    while max(store.artifacts(), default=0) < ckpt_version + 3 and time.monotonic() < deadline and second.poll() is None:
        time.sleep(0.02)
    second.send_signal(signal.SIGKILL)
    second.wait()
    announced_before = max(store.artifacts())
    assert announced_before >= ckpt_version + 3, log.read_text()[-3000:]
    assert store.versions() == [ckpt_version]  # versions announced, no training checkpoint since

    summary_path = tmp_path / "summary.json"
    third = trainer(env, log, "--exit-when-idle", "3", "--summary-json", str(summary_path))
    assert third.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"resumed from model version {ckpt_version} (its training checkpoint) at offsets" in text
    v, ckpt = store.load_latest()  # type: ignore[misc]
    assert v > announced_before
    extra = ckpt["extra"]
    assert sum(extra["offsets"].values()) == len(samples)  # every record consumed ...
    mixer = extra["learner"]["mixer"]
    waiting = sum(len(b["ids"]) for b in mixer["ready"]) + sum(len(b["ids"]) for q in mixer["held"] for b in q)
    assert extra["learner"]["trained_samples"] + waiting == expected_rows  # ... and trained on exactly once
    anns = [parse_version(r.value) for r in read_topic(settings, settings.topic_model_versions, 2.0)]
    numbers = [a.version for a in anns]
    assert numbers == sorted(set(numbers))  # never a number twice, always upwards
    after = [a for a in anns if a.version > announced_before]
    assert after and after[0].artifact == "full" and all(a.artifact in ("delta", "full") for a in after)
    assert all(Path(a.path).exists() for a in anns)  # each names its serving artifact (kept: MODEL_STORE_KEEP)
