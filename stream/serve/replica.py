"""The scorer's side of the serving refresh: one replica of the served model, kept up to date by
applying delta versions in place, in order, with their checksum chain verified; when a delta is
missing, damaged or does not chain onto the replica, the newest full snapshot (plus the deltas
after it) is loaded instead (``aitm.artifact``; the trainer's side: ``stream.learn.refresh``).

Loading files (``prepare``) runs on the version watcher's thread; applying (``apply``) runs
between batches, under the replica's lock, which every ``ScoringModel`` it hands out takes to
score: no request sees half a delta. A scorer holds one copy of the model (two briefly while a
full snapshot replaces the replica).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aitm.artifact import DELTA, FULL, ArtifactError, Replica
from stream.ops.model_store import ModelStore, ModelStoreError
from stream.serve.scoring import ScoringModel, traced

log = logging.getLogger(__name__)
MISSING, BROKEN, DAMAGED = "missing_delta", "broken_chain", "damaged_file"


@dataclass
class Plan:
    """The artifacts that take the replica to ``target``: a full snapshot to start from (None:
    the replica as it is) and the deltas after it, in order; ``reason`` a fallback's cause."""

    target: int
    full: dict[str, Any] | None
    deltas: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None


class ReplicaLoader:
    """Loads and applies serving artifacts; ``fallbacks``/``apply_seconds``: the scorer's metrics."""

    def __init__(self, store: ModelStore, fallbacks: Any = None, apply_seconds: Any = None,
                 trace: bool = False) -> None:
        self.store = store
        self.replica: Replica | None = None
        self.lock = threading.Lock()
        self.fallbacks = fallbacks
        self.apply_seconds = apply_seconds
        self.trace = trace

    def has(self, version: int) -> bool:
        """Whether ``version`` has a serving artifact (else: a checkpoint-only version)."""
        return version in self.store.artifacts()

    def prepare(self, target: int) -> Plan | None:
        """Load what reaches ``target`` (None: nothing newer than the replica can be reached);
        raises ``ModelStoreError`` when no full snapshot loads."""
        arts = self.store.artifacts()
        base = self.replica.version if self.replica is not None else None
        reason = None
        if base is not None and base < target:
            deltas: list[dict[str, Any]] = []
            for v in range(base + 1, target + 1):
                if DELTA not in arts.get(v, ()):
                    # a version with a full snapshot only (the trainer restarted): load that
                    reason = None if FULL in arts.get(v, ()) else MISSING
                    break
                try:
                    deltas.append(self.store.load_artifact(v, DELTA))
                except ModelStoreError as exc:
                    log.warning("delta version %d: %s", v, exc)
                    reason = DAMAGED
                    break
            else:
                return Plan(target, None, deltas)
        return self._from_full(target, arts, base, reason)

    def _from_full(self, target: int, arts: dict[int, set[str]], base: int | None,
                   reason: str | None) -> Plan | None:
        for f in sorted((v for v, kinds in arts.items() if FULL in kinds and v <= target), reverse=True):
            if base is not None and f <= base and DELTA not in arts.get(base + 1, ()):
                return None  # nothing past the replica to load
            try:
                full = self.store.load_artifact(f, FULL)
            except ModelStoreError as exc:
                log.warning("full snapshot %d: %s", f, exc)
                continue
            deltas = []
            for v in range(f + 1, target + 1):
                if DELTA not in arts.get(v, ()):
                    break
                try:
                    deltas.append(self.store.load_artifact(v, DELTA))
                except ModelStoreError:
                    break
            if base is not None and f + len(deltas) <= base:
                return None  # the replica is already at least that new
            return Plan(target, full, deltas, reason)
        raise ModelStoreError(f"no full snapshot at or before version {target} loads from {self.store.root}")

    def apply(self, plan: Plan, created_at_ms: int = 0) -> ScoringModel:
        """Bring the replica to the plan's version (or as far as its chain holds); the model to serve."""
        if plan.full is None:
            assert self.replica is not None
            rep = self.replica
            with self.lock:
                for art in plan.deltas:
                    if int(art["version"]) <= rep.version:
                        continue
                    t0 = time.perf_counter()
                    try:
                        rep.apply(art)
                    except ArtifactError as exc:
                        log.warning("falling back to a full snapshot: %s", exc)
                        break
                    if self.apply_seconds is not None:
                        self.apply_seconds.observe(time.perf_counter() - t0)
                else:
                    return self._model(created_at_ms)
            again = self._from_full(plan.target, self.store.artifacts(), rep.version, BROKEN)
            if again is None:
                return self._model(created_at_ms)
            plan = again
        assert plan.full is not None
        rep = Replica.from_full(plan.full)  # new objects: scored by nobody yet
        for art in plan.deltas:
            try:
                rep.apply(art)
            except ArtifactError as exc:
                log.warning("delta chain after full snapshot %d broken: %s", plan.full["version"], exc)
                break
        if plan.reason is not None:
            if self.fallbacks is not None:
                self.fallbacks.labels(reason=plan.reason).inc()
            log.warning("model version %d from full snapshot %d (%s)", rep.version, plan.full["version"], plan.reason)
        self.replica = rep
        return self._model(created_at_ms)

    def _model(self, created_at_ms: int) -> ScoringModel:
        rep = self.replica
        assert rep is not None
        fast = traced(rep.model, len(rep.table.fields)) if self.trace else None
        return ScoringModel(rep.version, rep.model, rep.table, created_at_ms, fast, lock=self.lock)
