"""Model versions written and announced off the training loop, on two writer threads.

- the **announcer** writes each version's serving artifact that a scorer needs now (the delta; a
  trainer's first version: its full snapshot; an encoder without a dynamic table: the training
  checkpoint) and announces it on ``model-versions``, in order, while training goes on;
- the **background** writer then writes what is big and not needed to follow the version: the
  periodic full serving snapshot and the training checkpoint (``TRAINER_TRAINING_CHECKPOINT_
  INTERVAL_MS``), after that version's announcement. The announcer never waits for it, so a
  gigabyte checkpoint does not hold back the next versions; the trainer takes no new big
  snapshot while one is still being written (``background_busy``).

A failed write surfaces when the next version is due (``wait``)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from stream.contract.versions import ModelVersion, encode_version
from stream.ops.clock import Clock
from stream.ops.model_store import ModelStore, file_sha256


class Publisher:
    """The writer threads. ``producer()`` gives the Kafka producer to announce with (made when the
    trainer connects); ``on_published`` runs on the announcer after each announcement;
    ``on_checkpoint(version, bytes)`` on the background writer after each training checkpoint."""

    def __init__(self, store: ModelStore, topic: str, producer: Callable[[], Any], clock: Clock,
                 on_published: Callable[[ModelVersion, int], None],
                 on_checkpoint: Callable[[int, int], None] | None = None) -> None:
        self.store, self.topic, self.producer, self.clock = store, topic, producer, clock
        self.on_published = on_published
        self.on_checkpoint = on_checkpoint
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-writer")
        self.writing: Future[ModelVersion] | None = None  # the version being announced
        self.background: Future[None] | None = None  # the full snapshot / training checkpoint being written
        self.artifact_bytes: dict[str, int] = {}  # size of the last serving artifact written, by kind

    def wait(self) -> None:
        """Until the version being announced is; raises its failure (and a finished background
        write's)."""
        if self.writing is not None:
            self.writing.result()
        if self.background is not None and self.background.done():
            self.background.result()

    def wait_all(self) -> None:
        """Until everything submitted is written and announced; raises a failure."""
        self.wait()
        if self.background is not None:
            self.background.result()

    def background_busy(self) -> bool:
        """A full snapshot or training checkpoint is still being written."""
        return self.background is not None and not self.background.done()

    def submit(self, version: int, ckpt: dict[str, Any] | None, trained: int, newest_ms: int,
               oldest_ms: int | None, artifacts: list[dict[str, Any]] | None = None) -> Future[ModelVersion]:
        """Announce ``version`` with its serving artifacts (``aitm.artifact``) and, when given, write
        the training checkpoint ``ckpt`` (snapshots: nothing may change them meanwhile). Without
        serving artifacts the checkpoint is what scorers load: written before the announcement."""
        self.wait()  # in order, and a failure surfaces
        arts = artifacts or []
        if not arts and ckpt is None:
            raise ValueError(f"version {version}: neither a serving artifact nor a checkpoint to announce")
        now = [a for a in arts if a["kind"] == "delta"] or arts[:1]  # what a scorer loads for this version
        later = [a for a in arts if not any(a is b for b in now)]
        self.writing = self._writer.submit(self._announce, version, now, None if arts else ckpt, trained, newest_ms,
                                           oldest_ms)
        if later or (arts and ckpt is not None):
            if self.background_busy():
                self.background.result()  # type: ignore[union-attr]  # the trainer avoids this (background_busy)
            self.background = self._background.submit(self._after, self.writing, later, ckpt if arts else None)
        return self.writing

    def _announce(self, version: int, now: list[dict[str, Any]], ckpt: dict[str, Any] | None, trained: int,
                  newest_ms: int, oldest_ms: int | None) -> ModelVersion:
        if ckpt is not None:  # no serving artifact (an encoder without a dynamic table): the checkpoint
            path, digest = self.store.publish(version, ckpt)
            kind = "checkpoint"
            self._checkpointed(version, path.stat().st_size)
        else:
            path = self._write(now[0])
            digest, kind = file_sha256(path), str(now[0]["kind"])
        now_ms = self.clock.now_ms()
        v = ModelVersion(
            version=version, path=str(path.resolve()), sha256=digest, trained_samples=trained,
            created_at_ms=now_ms, max_sample_consumed_at_ms=newest_ms,
            min_new_sample_consumed_at_ms=oldest_ms or now_ms, artifact=kind,
        )
        producer = self.producer()
        producer.send(self.topic, key=b"model", value=encode_version(v))
        producer.flush()
        self.on_published(v, now_ms)
        return v

    def _after(self, announced: Future[ModelVersion], later: list[dict[str, Any]], ckpt: dict[str, Any] | None) -> None:
        """After the version's announcement: its full snapshot (scorers that start or lost the chain
        load it), then the training checkpoint."""
        v = announced.result()
        for artifact in later:
            self._write(artifact)
        if ckpt is not None:
            path, _ = self.store.publish(v.version, ckpt)
            self._checkpointed(v.version, path.stat().st_size)

    def _checkpointed(self, version: int, size: int) -> None:
        self.artifact_bytes["checkpoint"] = size
        if self.on_checkpoint is not None:
            self.on_checkpoint(version, size)

    def _write(self, artifact: dict[str, Any]) -> Any:
        path, size = self.store.publish_artifact(artifact)
        self.artifact_bytes[str(artifact["kind"])] = size
        return path

    def checkpoint_only(self, version: int, ckpt: dict[str, Any]) -> Future[None]:
        """A training checkpoint for ``version``, already announced (a clean stop with nothing new
        since: the training state of that version), on the background writer."""
        if self.background_busy():
            self.background.result()  # type: ignore[union-attr]
        done: Future[ModelVersion] = Future()
        done.set_result(ModelVersion(version, "-", "0" * 64, 0, 0, 0, 0))
        self.background = self._background.submit(self._after, done, [], ckpt)
        return self.background

    def close(self) -> None:
        """Finish (write and announce) what was submitted, then stop the threads."""
        self._writer.shutdown(wait=True)
        self._background.shutdown(wait=True)
