"""Following ``model-versions``: load each newer announced version (verified) as the next model,
and hand it over between batches."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from stream.contract.versions import InvalidVersion, ModelVersion, parse_version
from stream.ops.model_store import ModelStore, ModelStoreError, file_sha256
from stream.ops.settings import Settings
from stream.serve.replica import Plan, ReplicaLoader
from stream.serve.scoring import ScoringModel

log = logging.getLogger(__name__)


def load_version(
    store: ModelStore, version: int, path: Path | None = None, sha256: str | None = None, created_at_ms: int = 0,
    trace: bool = False,
) -> ScoringModel:
    """A model version from the store, verified (the checkpoint's checksum, and the file's sha256
    when given), ready to score: the one loader behind the scorer and ``aitm-stream export``.
    Raises ``ModelStoreError`` (missing, corrupted) or ``KeyError``/``RuntimeError``/``ValueError``
    (a checkpoint that does not fit the model). ``trace``: serve a TorchScript trace too."""
    ckpt = store.load(version=None if path else version, path=path, sha256=sha256)
    return ScoringModel.from_checkpoint(version, ckpt, created_at_ms, trace=trace)


def load_servable(store: ModelStore, version: int, sha256: str | None = None,
                  created_at_ms: int = 0, file_name: str | None = None) -> ScoringModel:
    """``load_version`` by the announced file's name in the store (``file_name``; else the store's
    own name for ``version``)."""
    return load_version(store, version, store.root / file_name if file_name else None, sha256, created_at_ms)


def load_served(store: ModelStore, version: int, trace: bool = False) -> ScoringModel:
    """A version as scorers serve it: rebuilt from its serving artifacts when it has them (the newest
    full snapshot at or before it and the deltas after it, chain verified) - most versions have no
    training checkpoint - else from its checkpoint. Raises ``ModelStoreError`` when neither loads."""
    if version in store.artifacts():
        loader = ReplicaLoader(store, trace=trace)
        plan = loader.prepare(version)
        m = loader.apply(plan) if plan is not None else None
        if m is None or m.version != version:
            raise ModelStoreError(f"model version {version} cannot be rebuilt from the serving artifacts in "
                                  f"{store.root} (the chain ends at {m.version if m else 'none'})")
        return m
    return load_version(store, version, trace=trace)


class VersionFollower:
    """The next model: ``offer`` loads an announced version if newer and verified, ``take`` hands it
    over once; ``watch`` reads the topic from the start and offers the newest of each poll.
    ``current`` says which version the caller serves (not newer: not loaded)."""

    def __init__(self, settings: Settings, store: ModelStore, refused: Any, metrics: Any = None) -> None:
        self.s = settings
        self.store = store
        self.refused = refused  # counter of versions refused
        self.current: ScoringModel | None = None
        self._next: ScoringModel | None = None
        self._next_plan: tuple[Plan, int] | None = None  # serving artifacts to apply, and created_at_ms
        self._next_version = -1  # the version ``take`` will hand over
        self._next_freshness_s: float | None = None
        self._next_lock = threading.Lock()
        # versions with serving artifacts: one replica, deltas applied in place (stream.serve.replica)
        self.replica = ReplicaLoader(store, getattr(metrics, "refresh_fallbacks", None),
                                     getattr(metrics, "delta_apply", None), trace=settings.scorer_torchscript)

    def offer(self, ann: ModelVersion) -> bool:
        """Load an announced version (verified) as the next model; False if refused or not newer."""
        newest = max(self._next_version, self.current.version if self.current is not None else -1)
        if ann.version <= newest:
            return False
        if ann.artifact != "checkpoint" or self.replica.has(ann.version):
            # a serving artifact is announced (an older announcement named the checkpoint: its
            # version's artifacts, when there are any, are loaded all the same)
            return self._offer_artifacts(ann)
        try:
            path = self.store.root / ann.path.rsplit("/", 1)[-1]
            m = load_version(self.store, ann.version, path, ann.sha256, ann.created_at_ms,
                             trace=self.s.scorer_torchscript)
        except (ModelStoreError, KeyError, RuntimeError, ValueError) as exc:
            self.refused.inc()
            log.warning("refusing model version %d: %s", ann.version, exc)
            return False
        with self._next_lock:
            self._next, self._next_plan, self._next_version = m, None, ann.version
            self._next_freshness_s = ann.min_new_sample_consumed_at_ms / 1000
        return True

    def _offer_artifacts(self, ann: ModelVersion) -> bool:
        """Load the serving artifacts that reach ``ann.version`` (applied by ``take``); the announced
        artifact must be the file announced (its sha256)."""
        try:
            if ann.artifact != "checkpoint":
                path = self.store.artifact_path(ann.version, ann.artifact)
                if path.name != ann.path.rsplit("/", 1)[-1]:
                    raise ModelStoreError(f"model version {ann.version} announces {ann.path}, not a {ann.artifact} artifact")
                try:
                    digest = file_sha256(path)
                except OSError as exc:
                    raise ModelStoreError(f"serving artifact {path} cannot be read: {exc}") from exc
                if digest != ann.sha256:
                    raise ModelStoreError(f"serving artifact {path} does not match its announced sha256 "
                                          "(replaced or corrupted after publication)")
            plan = self.replica.prepare(ann.version)
        except (ModelStoreError, KeyError, RuntimeError, ValueError) as exc:
            self.refused.inc()
            log.warning("refusing model version %d: %s", ann.version, exc)
            return False
        if plan is None:
            return False
        with self._next_lock:
            self._next, self._next_plan, self._next_version = None, (plan, ann.created_at_ms), ann.version
            self._next_freshness_s = ann.min_new_sample_consumed_at_ms / 1000
        return True

    def take(self) -> tuple[ScoringModel, float | None] | None:
        """The pending version and when its newest sample was consumed (s), once; None if none.
        A version of serving artifacts is applied to the replica here (between batches)."""
        with self._next_lock:
            m, self._next = self._next, None
            plan, self._next_plan = self._next_plan, None
            fresh_from = self._next_freshness_s
        if plan is not None:
            try:
                m = self.replica.apply(*plan)
            except (ModelStoreError, KeyError, RuntimeError, ValueError) as exc:
                self.refused.inc()
                log.warning("refusing model version %d: %s", plan[0].target, exc)
                return None
        if m is None:
            return None
        self.current = m
        return m, fresh_from

    def watch(self, stop: threading.Event) -> None:
        """Follow ``model-versions`` from the start; offer the newest of each poll, newest first."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(
            client_id="aitm-scorer-versions",
            group_id=None,
            enable_auto_commit=False,
            **self.s.kafka_python_config(),
        )
        tps = [
            TopicPartition(self.s.topic_model_versions, p)
            for p in sorted(consumer.partitions_for_topic(self.s.topic_model_versions) or {0})
        ]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek_to_beginning(tp)
        try:
            while not stop.is_set():
                anns = []
                for records in consumer.poll(timeout_ms=100).values():
                    for rec in records:
                        try:
                            anns.append(parse_version(rec.value or b""))
                        except InvalidVersion as exc:
                            self.refused.inc()
                            log.warning("bad model-versions record at offset %d: %s", rec.offset, exc.message)
                for ann in sorted(anns, key=lambda a: -a.version):
                    if self.offer(ann):
                        break
        finally:
            consumer.close()
