"""Checkpoints as one plain dict, written atomically with a sha256 checksum verified on load.

File layout: ``MAGIC`` line, the payload's sha256 as 64 hex digits and a newline, then the
``torch.save`` payload. Loading uses ``torch.load(weights_only=True)``: plain data and tensors only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aitm.model import AITMConfig

MAGIC = b"AITM-CHECKPOINT v1\n"
FORMAT_VERSION = 1
_DIGEST_LEN = 64


class CheckpointError(Exception):
    """A checkpoint file is missing, truncated, corrupted or not a checkpoint."""


def make_checkpoint(
    model: nn.Module,
    config: Any,
    feature_maps: Mapping[str, Any],
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Bundle model state, config (dataclass or dict), feature maps, step and extra metadata."""
    cfg = (
        dataclasses.asdict(config)
        if dataclasses.is_dataclass(config) and not isinstance(config, type)
        else dict(config)
    )
    return {
        "format_version": FORMAT_VERSION,
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": cfg,
        "feature_maps": dict(feature_maps),
        "step": int(step),
        "extra": dict(extra or {}),  # e.g. consumed Kafka offsets per partition
    }


def save_checkpoint(path: str | Path, checkpoint: Mapping[str, Any]) -> None:
    """Write ``checkpoint`` to ``path`` atomically: temp file in the same dir, fsync, rename."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **checkpoint}, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + digest + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint; raise ``CheckpointError`` if it is absent or corrupted."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    header_len = len(MAGIC) + _DIGEST_LEN + 1
    if len(data) < header_len or not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not an AITM checkpoint (bad header); delete or replace it")
    digest = data[len(MAGIC) : len(MAGIC) + _DIGEST_LEN].decode("ascii", errors="replace")
    payload = data[header_len:]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise CheckpointError(
            f"checksum mismatch in {path} (stored {digest[:12]}..., actual {actual[:12]}...): "
            "the file is corrupted or truncated; fall back to an older checkpoint"
        )
    try:
        obj = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors have many types; report them as one
        raise CheckpointError(f"cannot unpickle checkpoint {path}: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has an unsupported checkpoint format")
    return obj


def config_from_dict(d: Mapping[str, Any]) -> AITMConfig:
    """An ``AITMConfig`` back from the plain dict a checkpoint holds (lists become tuples)."""
    names = {f.name for f in dataclasses.fields(AITMConfig)}
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return AITMConfig(**kwargs)


def snapshot(obj: Any) -> Any:
    """``obj`` with every tensor cloned (dicts, lists and tuples rebuilt): a snapshot that the
    training going on meanwhile cannot change under the writer thread."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(snapshot(v) for v in obj)
    return obj
