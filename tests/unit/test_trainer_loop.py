"""The trainer's loop and checkpoints without Kafka: a scripted feed of chunks and a recording
producer stand in for the broker. Batching (a chunk that would overflow the batch trains what is
gathered first), offsets (a record counts as consumed once trained on or dead-lettered, chunks of
invalid records only included), the checkpoint snapshot against the writer thread, a failed write
surfacing, and the warm start."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from aitm.checkpoint import make_checkpoint
from aitm.embedding_table import DynamicTable
from aitm.features import FeatureEncoder
from aitm.model import AITM, AITMConfig
from stream.contract.samples import Sample
from stream.learn.feed import Chunk, Invalid
from stream.learn.learner import ModelOptions, OnlineLearner, model_options
from stream.learn.sample_batch import SampleBatch
from stream.learn.trainer import Trainer
from stream.ops.settings import Settings

ALL = (True, True, True, True)


def samples(start: int, n: int) -> SampleBatch:
    return SampleBatch.from_samples([
        Sample(f"i{i}", "bank_1", i, {"f": str(i % 3)}, (i % 2, 0, 0, 0), ALL, "final", 1000, 5)
        for i in range(start, start + n)
    ])


def chunk(start: int, n: int, next_offset: int, invalid: int = 0) -> Chunk:
    bad = [Invalid("samples", 0, next_offset - invalid + k, b"k", b"{", "malformed_json", "not JSON")
           for k in range(invalid)]
    return Chunk(samples=samples(start, n) if n else SampleBatch.empty(), invalid=bad, offsets={0: next_offset},
                 kinds={"final": n} if n else {}, fetched_at_s=1.0)


class Feed:
    """Hands out the scripted chunks, then nothing; records the trainer's committed offsets and
    how much was gathered but not trained each time it is asked."""

    def __init__(self, trainer: Trainer, chunks: list[Chunk]) -> None:
        self.trainer = trainer
        self.chunks = list(chunks)
        self.offsets_seen: list[dict[int, int]] = []

    def get(self, timeout_s: float) -> Chunk | None:
        self.offsets_seen.append(dict(self.trainer.offsets))
        if self.chunks:
            return self.chunks.pop(0)
        time.sleep(timeout_s)  # as the real feed: nothing came within the timeout
        return None

    def lag(self, consumed: Any) -> int | None:
        return None


class Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append((topic, key, value))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class Recording(Trainer):
    """The trainer, recording the size of each batch it trains."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.batches: list[int] = []

    def _step(self, batch: SampleBatch, first_at_ms: int, last_at_ms: int, order: np.ndarray | None = None) -> None:
        self.batches.append(len(batch))
        super()._step(batch, first_at_ms, last_at_ms, order)


def make(tmp_path: Path, chunks: list[Chunk], **settings: Any) -> tuple[Recording, Feed, Producer]:
    s = Settings(data_dir=tmp_path, trainer_batch_size=10, trainer_linger_ms=1000, trainer_min_step_rows=1,
                 trainer_feature_min_count=1, trainer_embedding_rows=64, trainer_device="cpu",
                 trainer_checkpoint_interval_ms=3_600_000, trainer_checkpoint_batches=1000, **settings)
    t = Recording(s, CollectorRegistry(), mode="final-only")
    feed, producer = Feed(t, chunks), Producer()
    t._feed, t._producer = feed, producer  # type: ignore[assignment]
    return t, feed, producer


def run(t: Trainer) -> None:
    stop = threading.Event()
    t.run(stop, exit_when_idle_s=0.3)


def test_a_chunk_that_would_overflow_the_batch_trains_what_was_gathered_first(tmp_path: Path) -> None:
    t, _, _ = make(tmp_path, [chunk(0, 6, 6), chunk(6, 6, 12), chunk(12, 3, 15), chunk(15, 1, 16)])
    run(t)
    # batch size 10: 6 (+6 would overflow) | 6 + 3 + 1 = 10, full
    assert t.batches == [6, 10]
    assert t.offsets == {0: 16}
    t2, _, _ = make(tmp_path / "b", [chunk(0, 5, 5), chunk(5, 5, 10), chunk(10, 2, 12)])
    run(t2)
    assert t2.batches == [10, 2]  # 5 + 5 fills the batch exactly: no overflow


def test_offsets_move_only_past_records_trained_or_dead_lettered(tmp_path: Path) -> None:
    chunks = [chunk(0, 4, 4), chunk(0, 0, 6, invalid=2), chunk(4, 8, 14), chunk(0, 0, 15, invalid=1)]
    t, feed, producer = make(tmp_path, chunks)
    run(t)
    assert t.batches == [4, 8]
    # asked for chunk k+1 once chunk k is handled: 4 samples gathered (not trained) -> still 0;
    # the invalid-only chunk after them waits for them; the overflow trains the 4 -> 6;
    # the 8 wait; the trailing invalid record waits for them too
    assert feed.offsets_seen[:5] == [{}, {}, {}, {0: 6}, {0: 6}]
    assert t.offsets == {0: 15}
    dead = [v for topic, _, v in producer.sent if topic == t.s.topic_dead_letters]
    assert len(dead) == 3 and t.dead == 3
    assert t.metrics.registry.get_sample_value("aitm_trainer_dead_letters_total",
                                               {"reason": "malformed_json"}) == 3


def test_a_chunk_of_invalid_records_only_moves_the_offsets_at_once_when_nothing_waits(tmp_path: Path) -> None:
    t, feed, _ = make(tmp_path, [chunk(0, 0, 3, invalid=3), chunk(0, 2, 5)])
    run(t)
    assert feed.offsets_seen[1] == {0: 3}  # consumed (dead-lettered) before the next chunk is asked for
    assert t.offsets == {0: 5} and t.batches == [2]


def test_the_checkpoint_is_the_snapshot_not_what_training_did_while_it_was_written(tmp_path: Path) -> None:
    t, _, producer = make(tmp_path, [chunk(0, 10, 10)])
    run(t)  # trains the 10 and, at its end, writes version 1
    assert t.learner is not None and t.version == 1
    release = threading.Event()
    publish = t.store.publish

    def slow_publish(version: int, ckpt: dict[str, Any]) -> Any:
        release.wait(10)
        return publish(version, ckpt)

    t.store.publish = slow_publish  # type: ignore[method-assign]
    announced = len(producer.sent)
    at_snapshot = copy.deepcopy(t.learner.served_model().state_dict())
    trained_then = t.learner.trained_samples
    pending = t.checkpoint_async(training=True)
    assert pending is not None
    # the version is announced (its serving delta) while its training checkpoint is still written
    v = pending.result(timeout=30)
    assert v.version == 2 and v.trained_samples == trained_then and v.artifact == "delta"
    assert t.publisher.background_busy() and t.store.versions() == [1]
    t._step(samples(100, 10), 0, 0)  # training goes on while the checkpoint is written
    assert any(not torch.equal(v, at_snapshot[k]) for k, v in t.learner.served_model().state_dict().items())
    release.set()
    t.publisher.wait_all()
    ckpt = t.store.load(2)
    for k, tensor in at_snapshot.items():
        assert torch.equal(ckpt["model_state"][k], tensor), k
    assert ckpt["extra"]["offsets"] == {0: 10}
    assert [topic for topic, _, _ in producer.sent[announced:]] == [t.s.topic_model_versions]


def test_a_failed_write_surfaces_at_the_next_checkpoint(tmp_path: Path) -> None:
    t, _, producer = make(tmp_path, [chunk(0, 10, 10)])
    run(t)

    def broken(*_: Any) -> Any:
        raise OSError("disk full")

    t.store.publish_artifact = broken  # type: ignore[method-assign]
    announced = len(producer.sent)
    pending = t.checkpoint_async()
    assert pending is not None
    with pytest.raises(OSError, match="disk full"):
        t.checkpoint_async()  # the next one waits for the previous write, and raises its error
    assert producer.sent[announced:] == []  # never announced
    assert t.store.versions() == [1] and t.store.artifacts() == {1: {"full"}}
    t.publisher.close()
    # a failed training checkpoint (written after the announcement) surfaces at the next version
    t, _, _ = make(tmp_path / "b", [chunk(0, 10, 10)])
    run(t)
    t.store.publish = broken  # type: ignore[method-assign]
    t._step(samples(100, 10), 0, 0)
    assert t.checkpoint_async(training=True) is not None
    t.publisher.background.exception(timeout=30)  # type: ignore[union-attr]
    t._step(samples(200, 10), 0, 0)
    with pytest.raises(OSError, match="disk full"):
        t.checkpoint_async()
    t.publisher.close()


def test_a_warm_start_begins_from_the_given_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3)
    enc = FeatureEncoder(("f",), capacity=16, min_count=1)
    enc.encode_dicts([{"f": "0"}, {"f": "1"}], update=True)
    cfg = AITMConfig(vocab_sizes=enc.vocab_sizes)
    model = AITM(cfg)
    path = tmp_path / "warm.pt"
    path.write_bytes(b"")
    from aitm.checkpoint import save_checkpoint

    save_checkpoint(path, make_checkpoint(model, cfg, enc.state_dict(), 0))
    t, _, _ = make(tmp_path / "run", [], trainer_warm_start=path)
    t.restore()
    assert t.learner is not None and t.offsets == {} and t.version == 0
    for k, v in model.state_dict().items():
        assert torch.equal(t.learner.model.state_dict()[k], v), k
    assert t.learner.encoder.vocab == enc.vocab
    ids = np.array([[1], [2]])
    np.testing.assert_allclose(t.learner.predict(ids), torch.sigmoid(model.eval()(torch.as_tensor(ids))).detach().numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("written_before_the_fields", [True, False])
def test_a_checkpoint_of_the_old_default_resumes_as_it_was_trained_under_the_new_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written_before_the_fields: bool
) -> None:
    # the product's default became the conditional head with the gated transfer (issue 17); a
    # checkpoint of the paper's AITM (joint, ait) - with or without the fields - keeps its network
    monkeypatch.delenv("TRAINER_AITM_HEAD", raising=False)
    monkeypatch.delenv("TRAINER_AITM_TRANSFER", raising=False)
    assert (Settings().trainer_aitm_head, Settings().trainer_aitm_transfer) == ("conditional", "gated")
    from aitm.checkpoint import save_checkpoint

    torch.manual_seed(5)
    enc = FeatureEncoder(("f",), capacity=16, min_count=1)
    enc.encode_dicts([{"f": "0"}, {"f": "1"}], update=True)
    cfg = AITMConfig(vocab_sizes=enc.vocab_sizes)
    model = AITM(cfg)
    ckpt = make_checkpoint(model, cfg, enc.state_dict(), 0)
    if written_before_the_fields:
        del ckpt["config"]["head"], ckpt["config"]["transfer"]
    path = tmp_path / "old.pt"
    save_checkpoint(path, ckpt)
    t, _, _ = make(tmp_path / "run", [], trainer_warm_start=path)
    t.restore()
    assert t.learner is not None
    restored = t.learner.model
    assert (restored.config.head, restored.config.transfer, restored.transfer_gate) == ("joint", "ait", None)
    ids = np.array([[1], [2]])
    np.testing.assert_allclose(t.learner.predict(ids), torch.sigmoid(model.eval()(torch.as_tensor(ids))).detach().numpy(),
                               rtol=1e-6)
    # and a cold start under the same settings is the new default
    cold = t._new_learner(("f",)).model
    assert (cold.config.head, cold.config.transfer) == ("conditional", "gated")


def test_published_versions_reach_a_scorer_as_a_full_snapshot_then_deltas(tmp_path: Path) -> None:
    """The trainer writes each version's serving artifact beside its checkpoint; a scorer's
    follower applies the deltas in place and serves what the checkpoint serves."""
    from stream.contract.versions import parse_version
    from stream.ops.metrics import ScorerMetrics
    from stream.serve.versions import VersionFollower, load_version

    t, _, producer = make(tmp_path, [chunk(0, 10, 10)], model_store_full_every=3,
                        model_store_keep_checkpoints=10)
    run(t)
    follower = VersionFollower(t.s, t.store, ScorerMetrics(CollectorRegistry()).refused_models)
    rows = [{"f": str(i % 5)} for i in range(20)]
    for v in range(2, 6):
        t._step(samples(100 * v, 10), 0, 0)
        assert t.checkpoint(training=True) is not None  # a checkpoint to compare each version with
        t.publisher.wait_all()  # (a periodic full snapshot waits while a checkpoint is written)
    assert t.store.artifacts() == {1: {"full"}, 2: {"delta"}, 3: {"delta"}, 4: {"delta", "full"}, 5: {"delta"}}
    assert [parse_version(v).artifact for _, _, v in producer.sent] == ["full", "delta", "delta", "delta", "delta"]
    assert t.metrics.registry.get_sample_value("aitm_trainer_version_bytes", {"kind": "delta"}) > 0
    for _, _, value in producer.sent:
        ann = parse_version(value)
        assert follower.offer(ann)
        taken = follower.take()
        assert taken is not None and taken[0].version == ann.version
        from_ckpt = load_version(t.store, ann.version)  # the checkpoint's served model
        assert np.array_equal(taken[0].predict(rows), from_ckpt.predict(rows))
    assert follower.replica.replica is not None and follower.replica.replica.version == 5


def cold_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, value: str) -> tuple[Trainer, OnlineLearner]:
    """(trainer, learner) of a cold start with the environment's ``setting`` at ``value``."""
    monkeypatch.setenv(setting, value)
    t, _, _ = make(tmp_path, [])
    return t, t._new_learner(("f", "g"))


@pytest.mark.parametrize("init", ["torch", "glorot"])
def test_the_dense_init_setting_reaches_the_cold_started_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, init: str
) -> None:
    _, learner = cold_started(tmp_path, monkeypatch, "TRAINER_DENSE_INIT", init)
    assert learner.model.config.dense_init == init
    biases = [float(b.detach().abs().max()) for b in learner.model.towers.biases]
    assert all(b > 0 for b in biases) if init == "torch" else all(b == 0 for b in biases)


@pytest.mark.parametrize("head", ["joint", "conditional"])
def test_the_aitm_head_setting_reaches_the_cold_started_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, head: str
) -> None:
    t, learner = cold_started(tmp_path, monkeypatch, "TRAINER_AITM_HEAD", head)
    assert learner.model.config.head == head
    rates = np.asarray(t.s.trainer_prior_rates)  # and it starts at the prior rates either way
    expect = rates if head == "joint" else rates / np.concatenate(([1.0], rates[:-1]))
    np.testing.assert_allclose(learner.model.head_b.detach().numpy(), np.log(expect / (1 - expect)), rtol=1e-5)


@pytest.mark.parametrize("transfer", ["ait", "gated"])
def test_the_aitm_transfer_setting_reaches_the_cold_started_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transfer: str
) -> None:
    model = cold_started(tmp_path, monkeypatch, "TRAINER_AITM_TRANSFER", transfer)[1].model
    assert model.config.transfer == transfer
    assert (model.transfer_gate is not None) == (transfer == "gated")


@pytest.mark.parametrize("experts", ["0", "8"])
def test_the_aitm_experts_setting_reaches_the_cold_started_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, experts: str
) -> None:
    model = cold_started(tmp_path, monkeypatch, "TRAINER_AITM_EXPERTS", experts)[1].model
    assert model.config.experts == int(experts)
    assert (model.experts is not None) == (experts != "0")
    assert Settings().trainer_aitm_experts == int(experts)


@pytest.mark.parametrize("detach", ["false", "true"])
def test_the_transfer_detach_setting_reaches_the_cold_started_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, detach: str
) -> None:
    model = cold_started(tmp_path, monkeypatch, "TRAINER_AITM_TRANSFER_DETACH", detach)[1].model
    assert model.config.transfer_detach is (detach == "true")
    assert Settings().trainer_aitm_transfer_detach is (detach == "true")


def test_a_negative_expert_count_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("TRAINER_AITM_EXPERTS", "-1")
    with pytest.raises(ValidationError, match="trainer_aitm_experts"):
        Settings()


def test_model_options_carry_every_shape_setting_to_a_bench_learner(monkeypatch: pytest.MonkeyPatch) -> None:
    # the benches that stand in for the trainer build their learner with model_options(settings):
    # each shape setting, away from its default, reaches the network they build
    detach_default = Settings.model_fields["trainer_aitm_transfer_detach"].default
    for name, value in (("TRAINER_DENSE_INIT", "glorot"), ("TRAINER_AITM_HEAD", "joint"),
                        ("TRAINER_AITM_TRANSFER", "ait"), ("TRAINER_AITM_EXPERTS", "4"),
                        ("TRAINER_AITM_TRANSFER_DETACH", "false" if detach_default else "true")):
        monkeypatch.setenv(name, value)
    learner = OnlineLearner(DynamicTable(("f", "g"), 1000), **model_options(Settings()))
    config = learner.model.config
    assert (config.dense_init, config.head, config.transfer, config.experts) == ("glorot", "joint", "ait", 4)
    assert config.transfer_detach is not detach_default
    assert set(model_options(Settings())) == set(ModelOptions.__annotations__)  # every option, by name


def test_the_product_keeps_the_previous_dense_init_by_default() -> None:
    assert Settings().trainer_dense_init == "torch"  # until the served-score smoothing is re-tuned
