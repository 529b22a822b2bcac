"""Model versions in a directory, and their announcement record on the ``model-versions`` topic.

Each version is one ``aitm.checkpoint`` file ``v00000042.ckpt`` (written atomically: temp file,
fsync, rename; a sha256 of the payload inside, verified on load; ``torch.load(weights_only=True)``).
The announcement carries the sha256 of the whole file as well, so a reader can tell a version
that was replaced or damaged after it was announced. A version that fails either check is
refused with ``ModelStoreError``; the caller keeps the version it has.

Announcement (JSON, ``schema_version`` 1)::

    {"schema_version": 1, "version": 42, "path": "/data/models/v00000042.ckpt", "sha256": "...",
     "trained_samples": 123456, "created_at_ms": 1767225600000,
     "max_sample_consumed_at_ms": 1767225599000, "min_new_sample_consumed_at_ms": 1767225597000}

``*_consumed_at_ms`` are wall times at which the trainer consumed the newest sample in this
version and the oldest sample that is new in it (freshness = use time minus the latter).

Training checkpoints are written at their own, slower cadence (``TRAINER_TRAINING_CHECKPOINT_INTERVAL_MS``),
so most versions have no ``.ckpt``; every version has a **serving artifact** (``aitm.artifact``):
``v00000042.delta.srv`` (the rows changed since version 41, and the dense weights) and, every N
versions or after a trainer start, ``v00000042.full.srv`` (served weights and vocabulary), in the
same file format (atomic, sha256 inside). Scorers load those, not the checkpoint; the announcement
names the artifact (``artifact``: ``delta``/``full``; ``checkpoint`` for an encoder without a
dynamic table, whose versions are all checkpoints, and in announcements older than the field). Pruning keeps the
newest ``keep`` versions' artifacts and every one from the newest full snapshot on, so the newest
version can always be rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aitm.artifact import finish
from aitm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)
_NAME = re.compile(r"^v(\d{8,})\.ckpt$")
_ARTIFACT = re.compile(r"^v(\d{8,})\.(full|delta)\.srv$")


class ModelStoreError(Exception):
    """A model version is missing, corrupted or does not match its announcement."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelStore:
    """A directory of numbered versions; keeps the newest ``keep`` versions' serving artifacts and
    the newest ``keep_checkpoints`` training checkpoints (``keep`` of them in a store without
    artifacts, where the checkpoints are what is served)."""

    def __init__(self, root: Path, keep: int = 20, keep_checkpoints: int | None = None) -> None:
        self.root = Path(root)
        self.keep = keep
        self.keep_checkpoints = keep if keep_checkpoints is None else keep_checkpoints
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a reader on a read-only mount, before any writer made the directory
            log.warning("model store %s does not exist and cannot be created (%s): waiting for a writer", root, exc)

    def path_of(self, version: int) -> Path:
        return self.root / f"v{version:08d}.ckpt"

    def versions(self) -> list[int]:
        """Version numbers present, ascending."""
        out: list[int] = []
        if not self.root.is_dir():
            return out
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def publish(self, version: int, checkpoint: Mapping[str, Any]) -> tuple[Path, str]:
        """Write ``checkpoint`` as ``version`` atomically; returns its path and file sha256."""
        path = self.path_of(version)
        save_checkpoint(path, checkpoint)
        digest = file_sha256(path)
        # beside serving artifacts a checkpoint only resumes training (and holds the optimizer too)
        keep = self.keep_checkpoints if self.artifacts() else self.keep
        for old in self.versions()[: -max(keep, 1)]:
            self.path_of(old).unlink(missing_ok=True)
        return path, digest

    def load(self, version: int | None = None, path: Path | None = None, sha256: str | None = None) -> dict[str, Any]:
        """Load and verify a version (by number or path); ``sha256`` checks the whole file."""
        if path is None:
            if version is None:
                raise ValueError("give a version number or a path")
            path = self.path_of(version)
        path = Path(path)
        if sha256 is not None:
            try:
                actual = file_sha256(path)
            except OSError as exc:
                raise ModelStoreError(f"model version file {path} cannot be read: {exc}") from exc
            if actual != sha256:
                raise ModelStoreError(
                    f"model version file {path} has sha256 {actual[:12]}..., the announcement says "
                    f"{sha256[:12]}...: refusing it (replaced or corrupted after publication)"
                )
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            raise ModelStoreError(str(exc)) from exc

    # --- serving artifacts ----------------------------------------------------------------------

    def artifact_path(self, version: int, kind: str) -> Path:
        return self.root / f"v{version:08d}.{kind}.srv"

    def artifacts(self) -> dict[int, set[str]]:
        """Version -> kinds (``full``, ``delta``) of the serving artifacts present."""
        out: dict[int, set[str]] = {}
        if not self.root.is_dir():
            return out
        for p in self.root.iterdir():
            m = _ARTIFACT.match(p.name)
            if m:
                out.setdefault(int(m.group(1)), set()).add(m.group(2))
        return out

    def publish_artifact(self, artifact: Mapping[str, Any]) -> tuple[Path, int]:
        """Write a serving artifact atomically; returns its path and size in bytes. Then prune:
        keep the newest ``keep`` and every one from the newest full snapshot on."""
        path = self.artifact_path(int(artifact["version"]), str(artifact["kind"]))
        save_checkpoint(path, finish(dict(artifact)))  # a deferred full snapshot is completed here
        size = path.stat().st_size
        present = self.artifacts()
        fulls = [v for v, kinds in present.items() if "full" in kinds]
        newest = sorted(present)[-self.keep :]
        floor = min(max(fulls) if fulls else newest[0], newest[0])
        for v, kinds in present.items():
            for kind in kinds if v < floor else ():
                self.artifact_path(v, kind).unlink(missing_ok=True)
        return path, size

    def load_artifact(self, version: int, kind: str, sha256: str | None = None) -> dict[str, Any]:
        """A version's serving artifact of ``kind``, its file checksum verified (and the whole
        file's sha256, when an announcement gives it); ``ModelStoreError`` if absent or damaged."""
        path = self.artifact_path(version, kind)
        if not path.exists():
            raise ModelStoreError(f"no {kind} serving artifact for model version {version} in {self.root}")
        if sha256 is not None and file_sha256(path) != sha256:
            raise ModelStoreError(f"serving artifact {path} does not match its announced sha256: refusing it")
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            raise ModelStoreError(str(exc)) from exc

    def latest_version(self) -> int:
        """The highest version number with a file here (a training checkpoint or a serving artifact):
        a restarted trainer numbers on from it, never reusing a number it may have announced."""
        return max([0, *self.versions(), *self.artifacts()])

    def load_latest(self) -> tuple[int, dict[str, Any]] | None:
        """The newest version that loads and verifies, skipping (and logging) corrupted ones."""
        for v in reversed(self.versions()):
            try:
                return v, self.load(v)
            except ModelStoreError as exc:
                log.warning("skipping model version %d: %s", v, exc)
        return None
