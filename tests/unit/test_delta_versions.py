"""Serving artifacts and delta versions: a scorer that applied a chain of deltas scores exactly as
one that loaded the full snapshot; a broken chain or a missing delta falls back to a full one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from aitm.artifact import DELTA, FULL, Replica, full_artifact
from aitm.checkpoint import load_checkpoint, save_checkpoint
from aitm.embedding_table import DynamicTable
from stream.contract.samples import Sample
from stream.learn.learner import OnlineLearner
from stream.learn.refresh import ServingWriter
from stream.learn.stabilisers import Stabilisers
from stream.ops.metrics import ScorerMetrics
from stream.ops.model_store import ModelStore
from stream.serve.replica import BROKEN, MISSING, ReplicaLoader
from stream.serve.scoring import ScoringModel

ALL = (True, True, True, True)
HOUR = 3_600_000
FIELDS = ("city", "user")


class Stream:
    """A learner on a small table (rows recycled: users churn, TTL 2 h) and its serving writer."""

    def __init__(self, full_every: int = 100) -> None:
        torch.manual_seed(0)
        self.table = DynamicTable(FIELDS, rows=12, min_count=1, ttl_ms=2 * HOUR, sketch_width=1024)
        self.learner = OnlineLearner(self.table, mode="final-only", lr=0.01, eval_window=100,
                                     stabilisers=Stabilisers(min_step_rows=1, ema_half_life_rows=200.0,
                                                             recentre_rows=0))
        self.writer = ServingWriter(full_every)
        self.k = 0

    def train(self, hour: int) -> None:
        users = [f"u{hour}-{j % 4}" for j in range(8)]  # new users every hour: old ones expire
        samples = [Sample(f"i{self.k + j}", "bank_1", hour * HOUR, {"city": f"c{j % 3}", "user": u},
                          (j % 2, 0, 0, 0), ALL, "final", 1000, 5) for j, u in enumerate(users)]
        self.k += len(samples)
        self.learner.step(samples)

    def publish(self, store: ModelStore, version: int, full: bool = False) -> dict[str, dict[str, object]]:
        """Write the version's artifacts; by kind."""
        ln = self.learner
        arts = self.writer.artifacts(version, ln.served_model(), ln.encoder, ln.take_changed_rows(), full=full)
        for art in arts:
            store.publish_artifact(art)
        return {str(a["kind"]): a for a in arts}


ROWS = [{"city": f"c{j % 4}", "user": f"u{h}-{j % 5}"} for h in range(8) for j in range(10)]


def _scores(m: ScoringModel) -> np.ndarray:
    return m.predict(ROWS)


def _full_model(art: dict[str, object]) -> ScoringModel:
    rep = Replica.from_full(art)
    return ScoringModel(rep.version, rep.model, rep.table, 0)


def test_a_scorer_in_step_applies_the_delta_beside_a_periodic_full_snapshot(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, keep=50)
    s = Stream(full_every=2)
    loader = ReplicaLoader(store)
    for v in range(1, 4):
        s.train(v)
        arts = s.publish(store, v)
        plan = loader.prepare(v)
        assert plan is not None and (plan.full is None) == (v > 1)  # 3 has both: the delta is used
        m = loader.apply(plan)
        assert np.array_equal(_scores(m), _scores(_full_model(arts[FULL]))) if FULL in arts else m.version == v
    assert sorted(store.artifacts()[3]) == [DELTA, FULL]


def test_a_chain_of_deltas_scores_exactly_as_the_full_snapshot(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, keep=50)
    s = Stream()
    loader = ReplicaLoader(store)
    s.train(0)
    assert list(s.publish(store, 1)) == [FULL]  # a writer's first artifact is a full snapshot
    m = loader.apply(loader.prepare(1))  # type: ignore[arg-type]
    total = s.learner.model.embedding.table.weight.shape[0]
    sizes = []
    for v in range(2, 7):
        s.train(v)
        art = s.publish(store, v)[DELTA]
        assert art["base_version"] == v - 1
        sizes.append(len(art["rows"]))  # type: ignore[arg-type]
        plan = loader.prepare(v)
        assert plan is not None and plan.full is None  # in place, from the previous version
        m = loader.apply(plan)
        assert m.version == v
        # the same version as a full snapshot, and as the trainer serves it: bit for bit
        full = full_artifact(v, s.learner.served_model(), s.table)
        ref = _full_model(full)
        assert np.array_equal(_scores(m), _scores(ref))
        assert torch.equal(m.model.embedding.table.weight, ref.model.embedding.table.weight)
        assert m.encoder.vocab == ref.encoder.vocab  # type: ignore[union-attr]
        served = ScoringModel(v, s.learner.served_model(), s.table, 0)
        assert np.array_equal(_scores(m), _scores(served))
    assert s.table.evictions > 0  # rows were recycled between versions: the vocabulary moved too
    assert max(sizes) < total  # a delta carries the rows changed, not the table


def test_a_broken_chain_falls_back_to_the_newest_full_snapshot(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, keep=50)
    metrics = ScorerMetrics(CollectorRegistry())
    s = Stream()
    loader = ReplicaLoader(store, metrics.refresh_fallbacks, metrics.delta_apply)
    for v in (1, 2):
        s.train(v)
        s.publish(store, v)
        loader.apply(loader.prepare(v))  # type: ignore[arg-type]
    at_two = _scores(loader._model(0))
    # version 3's delta is tampered with after writing (its file checksum rewritten: only the chain knows)
    s.train(3)
    s.publish(store, 3)
    path = store.artifact_path(3, DELTA)
    art = load_checkpoint(path)
    art["values"] = art["values"] + 0.5
    save_checkpoint(path, art)
    plan = loader.prepare(3)
    assert plan is not None and plan.full is None
    m = loader.apply(plan)
    # refused in place; rebuilt from full snapshot 1 + the deltas that chain (2): not the damaged 3
    assert m.version == 2 and np.array_equal(_scores(m), at_two)
    assert metrics.registry.get_sample_value("aitm_scorer_refresh_fallbacks_total", {"reason": BROKEN}) == 1
    # the next full snapshot (every N versions, or on demand) repairs it
    s.train(4)
    full = s.publish(store, 4, full=True)[FULL]
    m = loader.apply(loader.prepare(4))  # type: ignore[arg-type]
    assert m.version == 4 and np.array_equal(_scores(m), _scores(_full_model(full)))
    assert loader.replica is not None and loader.replica.chain == full["chain"]


def test_a_missing_delta_falls_back_to_the_newest_full_snapshot(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, keep=50)
    metrics = ScorerMetrics(CollectorRegistry())
    s = Stream(full_every=3)  # a full snapshot at 1, and beside the deltas of 4 and 7
    loader = ReplicaLoader(store, metrics.refresh_fallbacks, metrics.delta_apply)
    s.train(1)
    s.publish(store, 1)
    loader.apply(loader.prepare(1))  # type: ignore[arg-type]
    for v in range(2, 6):
        s.train(v)
        s.publish(store, v)
    assert store.artifacts() == {1: {FULL}, 2: {DELTA}, 3: {DELTA}, 4: {DELTA, FULL}, 5: {DELTA}}
    store.artifact_path(2, DELTA).unlink()  # lost
    assert loader.prepare(3) is None  # nothing newer reachable: keep serving version 1
    plan = loader.prepare(5)
    assert plan is not None and plan.reason == MISSING and plan.full is not None
    m = loader.apply(plan)
    ref = _full_model(full_artifact(5, s.learner.served_model(), s.table))
    assert m.version == 5 and np.array_equal(_scores(m), _scores(ref))
    assert metrics.registry.get_sample_value("aitm_scorer_refresh_fallbacks_total", {"reason": MISSING}) == 1


def test_the_store_keeps_every_artifact_from_the_newest_full_snapshot(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, keep=2)
    s = Stream(full_every=4)
    for v in range(1, 8):  # full snapshots at 1 and 5
        s.train(v)
        s.publish(store, v)
    assert store.artifacts() == {5: {DELTA, FULL}, 6: {DELTA}, 7: {DELTA}}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp file


def test_the_vocabulary_text_round_trips_empty_and_non_ascii_values() -> None:
    from aitm.artifact import _vocab_of, vocab_values

    t = DynamicTable(("city",), rows=4, min_count=1, ttl_ms=HOUR, sketch_width=64)
    t.encode_columns({"city": ["Tromsø", "東京", "x"]}, 3, update=True, event_time_ms=[0, 0, 0])
    used = np.flatnonzero(t.row_field >= 0)
    assert sorted(vocab_values(_vocab_of(t, used))) == sorted(["Tromsø", "東京", "x"])
    assert vocab_values(_vocab_of(t, used[:0])) == []  # a delta with no vocabulary change
