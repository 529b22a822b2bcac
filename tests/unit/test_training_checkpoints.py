"""Two cadences (issue 13, last piece): model versions (serving artifacts, announced) every
TRAINER_CHECKPOINT_INTERVAL_MS, training checkpoints (what a restart resumes from, with the sample
offsets) every TRAINER_TRAINING_CHECKPOINT_INTERVAL_MS and at a clean stop. A trainer killed after
announcing versions past its last training checkpoint resumes from that checkpoint's offsets and
numbers on past every version it announced; a scorer following the announcements (which name the
serving artifacts) stays on a valid chain across the restart."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from stream.contract.schemas import version_schema
from stream.contract.versions import InvalidVersion, ModelVersion, encode_version, parse_version
from stream.ops.metrics import ScorerMetrics
from stream.serve.scoring import ScoringModel
from stream.serve.versions import VersionFollower, load_served
from tests.unit.test_trainer_loop import Recording, chunk, make, run, samples

ROWS = [{"f": str(i % 5)} for i in range(20)]


def announced(producer: Any, topic: str) -> list[ModelVersion]:
    return [parse_version(v) for t, _, v in producer.sent if t == topic]


def counter(t: Recording, name: str) -> float:
    return t.metrics.registry.get_sample_value(name) or 0.0


def test_versions_and_training_checkpoints_have_independent_cadences(tmp_path: Path) -> None:
    t, _, producer = make(tmp_path, [chunk(0, 10, 10)], trainer_training_checkpoint_interval_ms=3_600_000)
    run(t)  # version 1, and at the clean stop its training checkpoint
    assert t.store.versions() == [1] and counter(t, "aitm_trainer_training_checkpoints_total") == 1
    for v in range(2, 7):
        t._step(samples(100 * v, 10), 0, 0)
        assert t.checkpoint() is not None
        t.publisher.wait_all()
    # five more versions announced, each with its serving artifact; no training checkpoint yet
    assert [a.version for a in announced(producer, t.s.topic_model_versions)] == [1, 2, 3, 4, 5, 6]
    assert sorted(t.store.artifacts()) == [1, 2, 3, 4, 5, 6] and t.store.versions() == [1]
    assert counter(t, "aitm_trainer_training_checkpoints_total") == 1
    # a version without a training checkpoint loads as served (aitm-stream export's loader)
    assert t.learner is not None
    at_six = ScoringModel(6, t.learner.served_model().eval(), t.learner.encoder, 0).predict(ROWS)
    assert np.array_equal(load_served(t.store, 6).predict(ROWS), at_six)
    # once the training interval has passed, the next version carries one
    t.last_training_ckpt_s -= 3_601
    t._step(samples(900, 10), 0, 0)
    t.checkpoint()
    t.publisher.wait_all()
    assert t.store.versions() == [1, 7] and counter(t, "aitm_trainer_training_checkpoints_total") == 2
    stall = t.metrics.registry.get_sample_value("aitm_trainer_publish_stall_seconds_count")
    assert stall == 7  # the training-thread cost of every version is measured

    # 0: a training checkpoint with every version (as before the two cadences)
    t0, _, _ = make(tmp_path / "every", [chunk(0, 10, 10)], trainer_training_checkpoint_interval_ms=0)
    run(t0)
    for v in range(2, 4):
        t0._step(samples(100 * v, 10), 0, 0)
        t0.checkpoint()
        t0.publisher.wait_all()
    assert t0.store.versions() == [1, 2, 3]


def test_a_clean_stop_writes_the_training_state_reached(tmp_path: Path) -> None:
    """Versions announced since the last training checkpoint, nothing new since the last one: the
    stop writes that version's training checkpoint, so a restart re-reads nothing."""
    t, _, _ = make(tmp_path, [chunk(0, 10, 10)], trainer_training_checkpoint_interval_ms=3_600_000)
    run(t)
    t._step(samples(100, 10), 0, 0)
    t.offsets = {0: 20}
    t.checkpoint()
    t.publisher.wait_all()
    assert t.store.versions() == [1]
    t.final_checkpoint()
    assert t.store.versions() == [1, 2]
    assert t.store.load(2)["extra"]["offsets"] == {0: 20}


def test_a_restart_resumes_from_the_last_training_checkpoint_and_numbers_on(tmp_path: Path) -> None:
    first, _, producer = make(tmp_path, [chunk(0, 10, 10)], trainer_training_checkpoint_interval_ms=3_600_000)
    run(first)  # version 1 with its training checkpoint at offsets {0: 10}
    scorer = ScorerMetrics(CollectorRegistry())
    follower = VersionFollower(first.s, first.store, scorer.refused_models, scorer)
    trained_at_ckpt = first.learner.trained_samples  # type: ignore[union-attr]
    for v, end in ((2, 20), (3, 30), (4, 40)):  # versions past the checkpoint, the offsets moving on
        first._step(samples(100 * v, 10), 0, 0)
        first.offsets = {0: end}
        first.checkpoint()
    first.publisher.wait_all()
    for ann in announced(producer, first.s.topic_model_versions):
        assert follower.offer(ann) and follower.take() is not None
    assert follower.current is not None and follower.current.version == 4
    # kill -9 here: no clean stop. The offsets saved are the checkpoint's, not the ones announced since
    assert first.store.versions() == [1] and first.store.load(1)["extra"]["offsets"] == {0: 10}

    second, _, producer2 = make(tmp_path, [chunk(10, 10, 20)], trainer_training_checkpoint_interval_ms=3_600_000)
    second.restore()
    assert second.offsets == {0: 10}  # samples after the checkpoint are read again
    assert second.learner is not None and second.learner.trained_samples == trained_at_ckpt
    assert second.version == 4  # numbers on from the highest version announced, not from the checkpoint's
    run(second)
    anns = announced(producer2, second.s.topic_model_versions)
    assert [(a.version, a.artifact) for a in anns] == [(5, "full")]  # a new chain starts with a full snapshot
    assert second.store.versions() == [1, 5] and second.store.load(5)["extra"]["offsets"] == {0: 20}
    # the scorer that followed the first trainer to version 4 follows on to 5, without a fallback
    assert follower.offer(anns[0])
    taken = follower.take()
    assert taken is not None and taken[0].version == 5
    served = second.learner.served_model()
    expected = ScoringModel(5, served.eval(), second.learner.encoder, 0).predict(ROWS)
    assert np.array_equal(taken[0].predict(ROWS), expected)
    for reason in ("missing_delta", "broken_chain", "damaged_file"):
        assert (scorer.registry.get_sample_value("aitm_scorer_refresh_fallbacks_total", {"reason": reason}) or 0) == 0
    assert scorer.refused_models._value.get() == 0


def test_the_scorer_refuses_an_announced_artifact_that_is_not_the_file_announced(tmp_path: Path) -> None:
    t, _, producer = make(tmp_path, [chunk(0, 10, 10)])
    run(t)
    t._step(samples(100, 10), 0, 0)
    t.checkpoint()
    t.publisher.wait_all()
    anns = announced(producer, t.s.topic_model_versions)
    assert [a.artifact for a in anns] == ["full", "delta"]
    assert anns[1].path.endswith("v00000002.delta.srv") and anns[0].path.endswith("v00000001.full.srv")
    refused = ScorerMetrics(CollectorRegistry()).refused_models
    follower = VersionFollower(t.s, t.store, refused)
    assert not follower.offer(dataclasses.replace(anns[1], sha256="0" * 64))
    assert refused._value.get() == 1
    assert follower.offer(anns[1]) and follower.take() is not None


def test_the_artifact_field_is_optional_and_checked() -> None:
    v = ModelVersion(3, "/m/v00000003.delta.srv", "a" * 64, 10, 1, 1, 1, artifact="delta")
    assert parse_version(encode_version(v)) == v
    jsonschema.validate(json.loads(encode_version(v)), version_schema())
    # an announcement from before the field: it named the checkpoint, and still validates
    old = {k: val for k, val in json.loads(encode_version(v)).items() if k != "artifact"}
    old["path"] = "/m/v00000003.ckpt"
    assert parse_version(json.dumps(old)).artifact == "checkpoint"
    jsonschema.validate(old, version_schema())
    with pytest.raises(InvalidVersion, match="artifact"):
        parse_version(json.dumps({**old, "artifact": "weights"}))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**old, "artifact": "weights"}, version_schema())
