"""Model versions written and announced off the training loop: each version file is written
(atomic, fsynced) and then announced on ``model-versions`` by one writer thread, in order, while
training goes on; a failed write surfaces when the next version is due (``wait``)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from stream.contract.versions import ModelVersion, encode_version
from stream.ops.clock import Clock
from stream.ops.model_store import ModelStore


class Publisher:
    """The writer thread. ``producer()`` gives the Kafka producer to announce with (made when the
    trainer connects); ``on_published`` runs on the writer thread after each announcement."""

    def __init__(self, store: ModelStore, topic: str, producer: Callable[[], Any], clock: Clock,
                 on_published: Callable[[ModelVersion, int], None]) -> None:
        self.store, self.topic, self.producer, self.clock = store, topic, producer, clock
        self.on_published = on_published
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self.writing: Future[ModelVersion] | None = None  # the version being written
        self.artifact_bytes: dict[str, int] = {}  # size of the last serving artifact written, by kind

    def wait(self) -> None:
        """Until the version being written is announced; raises its failure."""
        if self.writing is not None:
            self.writing.result()

    def submit(self, version: int, ckpt: dict[str, Any], trained: int, newest_ms: int,
               oldest_ms: int | None, artifacts: list[dict[str, Any]] | None = None) -> Future[ModelVersion]:
        """Write and announce ``ckpt`` (a snapshot: nothing may change it meanwhile) as ``version``,
        with its serving artifacts (``aitm.artifact``)."""
        self.wait()  # in order, and a failure surfaces
        self.writing = self._writer.submit(self._publish, version, ckpt, trained, newest_ms, oldest_ms, artifacts or [])
        return self.writing

    def _publish(self, version: int, ckpt: dict[str, Any], trained: int, newest_ms: int,
                 oldest_ms: int | None, artifacts: list[dict[str, Any]] | None = None) -> ModelVersion:
        arts = artifacts or []
        # a full snapshot beside a delta is written after the announcement: a scorer in step needs
        # only the delta (one starting meanwhile rebuilds from the previous snapshot and the deltas)
        later = [a for a in arts if a["kind"] == "full"] if any(a["kind"] == "delta" for a in arts) else []
        for artifact in arts:
            if not any(artifact is a for a in later):  # before the announcement: a scorer finds them
                self._write(artifact)
        path, digest = self.store.publish(version, ckpt)
        now_ms = self.clock.now_ms()
        v = ModelVersion(
            version=version, path=str(path.resolve()), sha256=digest, trained_samples=trained,
            created_at_ms=now_ms, max_sample_consumed_at_ms=newest_ms,
            min_new_sample_consumed_at_ms=oldest_ms or now_ms,
        )
        producer = self.producer()
        producer.send(self.topic, key=b"model", value=encode_version(v))
        producer.flush()
        self.on_published(v, now_ms)
        for artifact in later:
            self._write(artifact)
        return v

    def _write(self, artifact: dict[str, Any]) -> None:
        _, size = self.store.publish_artifact(artifact)
        self.artifact_bytes[str(artifact["kind"])] = size

    def close(self) -> None:
        """Finish (write and announce) the version being written, then stop the thread."""
        self._writer.shutdown(wait=True)
