"""Model store versions and announcements: atomic, verified, corrupted versions refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from aitm.checkpoint import make_checkpoint
from aitm.features import FeatureEncoder
from aitm.model import AITM, AITMConfig
from stream.contract.versions import InvalidVersion, ModelVersion, encode_version, parse_version
from stream.ops.model_store import ModelStore, ModelStoreError


def checkpoint(seed: int) -> dict:
    torch.manual_seed(seed)
    enc = FeatureEncoder(("a", "b"), capacity=8, min_count=1)
    cfg = AITMConfig(vocab_sizes=enc.vocab_sizes)
    return make_checkpoint(AITM(cfg), cfg, enc.state_dict(), step=seed)


def test_publish_load_and_keep_newest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, keep=3)
    digests = {}
    for v in range(1, 6):
        _, digests[v] = store.publish(v, checkpoint(v))
    assert store.versions() == [3, 4, 5]
    got = store.load(5, sha256=digests[5])
    assert got["step"] == 5
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_a_corrupted_version_is_refused_and_the_previous_one_loads(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.publish(1, checkpoint(1))
    path, digest = store.publish(2, checkpoint(2))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelStoreError, match="checksum mismatch"):
        store.load(2)
    with pytest.raises(ModelStoreError, match="sha256"):
        store.load(2, sha256=digest)
    latest = store.load_latest()
    assert latest is not None and latest[0] == 1


def test_truncated_version_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    path, _ = store.publish(1, checkpoint(1))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelStoreError):
        store.load(1)
    assert store.load_latest() is None


def test_announcement_round_trip_and_validation() -> None:
    v = ModelVersion(3, "/m/v00000003.ckpt", "a" * 64, 100, 1, 2, 1)
    assert parse_version(encode_version(v)) == v
    bad = [
        b"not json",
        b"[]",
        encode_version(dataclasses.replace(v, sha256="xyz")),
        encode_version(dataclasses.replace(v, version=-1)),
        encode_version(v).replace(b'"schema_version":1', b'"schema_version":2'),
        encode_version(v).replace(b'"path"', b'"pth"'),
    ]
    for raw in bad:
        with pytest.raises(InvalidVersion):
            parse_version(raw)


def test_a_reader_waits_for_a_store_it_cannot_create(tmp_path: Path) -> None:
    """A scorer on a read-only mount before any trainer wrote: no crash, no versions yet."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store = ModelStore(blocker / "models")  # mkdir fails (the parent is a file): an OSError
    assert store.versions() == []
    assert store.load_latest() is None


def test_training_checkpoints_beside_serving_artifacts_keep_their_own_count(tmp_path: Path) -> None:
    """A trainer that writes serving artifacts needs its training checkpoints only to resume: the
    store keeps the newest ``keep_checkpoints`` of those (each holds the whole model and optimizer),
    while the served history keeps ``keep`` versions' artifacts."""
    store = ModelStore(tmp_path, keep=4, keep_checkpoints=2)
    for v in range(1, 9):
        store.publish_artifact({"version": v, "kind": "full"})
        if v % 2 == 0:
            store.publish(v, checkpoint(v))
    assert store.versions() == [6, 8]
    assert sorted(store.artifacts()) == [5, 6, 7, 8]
    assert store.load_latest() is not None and store.load_latest()[0] == 8  # type: ignore[index]


def test_checkpoint_only_versions_are_the_served_form_and_keep_the_served_count(tmp_path: Path) -> None:
    """A store with no serving artifacts (a fixed-vocabulary warm start, an older trainer) serves its
    checkpoints: they keep ``keep`` versions, whatever ``keep_checkpoints`` says."""
    store = ModelStore(tmp_path, keep=4, keep_checkpoints=2)
    for v in range(1, 7):
        store.publish(v, checkpoint(v))
    assert store.versions() == [3, 4, 5, 6]
