"""The scorer on the embedded broker: versions hot-swapped while impressions stream, none lost or
scored twice; a corrupted announced version is refused and the previous one stays in use."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable

import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry

from aitm.checkpoint import make_checkpoint
from aitm.features import FeatureEncoder
from aitm.model import AITM, AITMConfig
from stream.contract.events import Event, encode_event
from stream.contract.versions import ModelVersion, encode_version
from stream.ops.model_store import ModelStore
from stream.ops.settings import Settings
from stream.serve.scorer import Scorer

FIELDS = ("a", "b")
BURSTS = 6
PER_BURST = 400


PUBLISHED: dict[int, tuple[AITM, FeatureEncoder]] = {}  # version -> the model and encoder published


def publish(store: ModelStore, producer: KafkaProducer, settings: Settings, version: int,
            sha: str | None = None) -> ModelVersion:
    torch.manual_seed(version)
    enc = FeatureEncoder(FIELDS, capacity=8, min_count=1)
    enc.encode_dicts([{"a": str(v), "b": "x"} for v in range(3)], update=True)  # values 3, 4: out of vocabulary
    cfg = AITMConfig(vocab_sizes=enc.vocab_sizes)
    model = AITM(cfg)
    with torch.no_grad():  # base rates that differ per task and per version
        p = torch.tensor([0.3, 0.1, 0.05, 0.02]) * (1 + version / 10)
        model.head_b.copy_(torch.log(p / (1 - p)))
    model.eval()
    PUBLISHED[version] = (model, enc)
    path, digest = store.publish(version, make_checkpoint(model, cfg, enc.state_dict(), version))
    now = int(time.time() * 1000)
    ann = ModelVersion(version, str(path), sha or digest, version * 100, now, now, now)
    producer.send(settings.topic_model_versions, value=encode_version(ann))
    producer.flush()
    return ann


def model_output(version: int, features: dict[str, str]) -> dict[str, float]:
    """What version ``version`` itself predicts, by task name: its end-to-end logits are in funnel
    order; served through a sigmoid with each step capped by the one before (aitm/projection.py)."""
    model, enc = PUBLISHED[version]
    with torch.no_grad():
        logits = model(torch.as_tensor(enc.encode_dicts([features])))[0].tolist()
    out, cap = {}, 1.0
    for task, z in zip(("click", "application", "approval", "activation"), logits, strict=True):
        cap = min(cap, 1.0 / (1.0 + math.exp(-z)))
        out[task] = cap
    return out


def wait_for(cond: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_hot_swap_loses_and_repeats_no_impression(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(kafka_session_timeout_ms=2000, scorer_batch_size=50)
    producer = KafkaProducer(**settings.kafka_python_config(), linger_ms=2)
    store = ModelStore(settings.model_store_path())
    publish(store, producer, settings, 1)
    registry = CollectorRegistry()
    scorer = Scorer(settings, registry)
    stop = threading.Event()
    threads = [threading.Thread(target=scorer.versions.watch, args=(stop,), daemon=True),
               threading.Thread(target=scorer.run, args=(stop,), daemon=True)]
    for t in threads:
        t.start()
    sent: list[str] = []
    bad_version = None
    try:
        for burst in range(BURSTS):
            for i in range(PER_BURST):
                iid = f"imp-{burst}-{i}"
                ev = Event(0, f"e-{iid}", iid, 1_767_225_600_000 + i, f"bank_{i % 3}", {"a": str(i % 5), "b": "x"})
                producer.send(settings.topic_impressions, key=iid.encode(), value=encode_event(ev))
                sent.append(iid)
            if burst == 2:
                producer.send(settings.topic_impressions, key=b"junk", value=b"{broken")
            producer.flush()
            wait_for(lambda: scorer.scored >= len(sent) - PER_BURST // 2)  # mid-stream, usually
            if burst == 3:  # an announced version whose file does not match: refused
                bad_version = publish(store, producer, settings, burst + 2, sha="0" * 64).version
                wait_for(lambda: registry.get_sample_value("aitm_scorer_refused_models_total") == 1)
            else:
                publish(store, producer, settings, burst + 2)
                wait_for(lambda v=burst + 2: scorer.model is not None and scorer.model.version == v)
        consumer = KafkaConsumer(settings.topic_scores, **settings.kafka_python_config(),
                                 auto_offset_reset="earliest", group_id=None, consumer_timeout_ms=1000)
        scores: list[dict] = []
        deadline = time.monotonic() + 60
        while len(scores) < len(sent) and time.monotonic() < deadline:
            scores += [json.loads(r.value) for r in consumer]
        time.sleep(1.0)
        scores += [json.loads(r.value) for r in consumer]  # anything extra would be a double score
        consumer.close()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        producer.close()
    ids = [s["impression_id"] for s in scores]
    assert len(ids) == len(set(ids)), "an impression was scored twice"
    assert set(ids) == set(sent), f"{len(set(sent) - set(ids))} impressions were never scored"
    versions = {s["model_version"] for s in scores}
    assert versions >= {2, 3, 4, 6}, f"expected hot swaps while streaming, saw versions {versions}"
    assert bad_version not in versions
    assert registry.get_sample_value("aitm_scorer_refused_models_total") == 1
    assert registry.get_sample_value("aitm_scorer_dead_letters_total", {"reason": "malformed_json"}) == 1
    assert registry.get_sample_value("aitm_scorer_scores_total") == len(sent)
    first = scores[0]
    assert set(first) == {"schema_version", "impression_id", "bank_id", "model_version", "probabilities",
                          "objective", "weight", "score", "event_time_ms", "scored_at_ms"}
    # one scorer: in scoring order, the version in use never goes back
    in_order = [s["model_version"] for s in sorted(scores, key=lambda s: s["scored_at_ms"])]
    assert in_order == sorted(in_order)
    # every published score is what the version it names predicts on that impression's features
    for s in scores:
        i = int(s["impression_id"].rsplit("-", 1)[1])
        want = model_output(s["model_version"], {"a": str(i % 5), "b": "x"})
        assert s["probabilities"] == pytest.approx(want, abs=1e-6), s
        assert s["objective"] == "approval" and s["score"] == pytest.approx(want["approval"], rel=1e-5)
