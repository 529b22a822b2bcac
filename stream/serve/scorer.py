"""``aitm-stream scorer``: score impressions onto ``scores``, follow ``model-versions``, serve HTTP.

- Stream path: a kafka-python consumer in group ``SCORER_GROUP_ID`` (scorers scale out by
  partitions) reads impressions; each polled batch is scored with *one* model version, the
  scores are produced and flushed, and only then are the offsets committed. A new version is
  swapped in between batches, so no impression is dropped or scored twice by a swap (a crash can
  still repeat a batch: at-least-once; the scores carry the impression id to dedupe on).
- Model refresh: a watcher thread reads ``model-versions`` from the beginning, loads the newest
  announced version (sha256 of the file and the checkpoint's own checksum verified) and hands it
  to the loop; a version that fails is refused, counted, and the current one stays in use.
- HTTP: ``POST /score`` with ``{"features": {...}, "bank_id": "bank_2"}`` returns the four
  probabilities, the bank's objective, weight and score; ``GET /healthz``. Bad input is a 4xx
  with a JSON ``{"error": ...}`` saying what is wrong.

Score record (JSON, ``schema_version`` 1; key = impression id)::

    {"schema_version": 1, "impression_id": "i-42", "bank_id": "bank_2", "model_version": 7,
     "probabilities": {"click": 0.21, "application": 0.02, "approval": 0.013, "activation": 0.009},
     "objective": "approval", "weight": 1.0, "score": 0.013,
     "event_time_ms": 1767225600000, "scored_at_ms": 1767225600123}
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

import numpy as np
import torch
from kafka import AsyncConsumerRebalanceListener
from prometheus_client import CollectorRegistry, start_http_server

from aitm.checkpoint import config_from_dict
from aitm.features import FeatureEncoder
from aitm.model import AITM
from aitm.projection import funnel_order
from stream.contract.events import (
    MAX_ID_LEN,
    MAX_RECORD_BYTES,
    TASKS,
    InvalidEvent,
    InvalidRecord,
    dead_letter,
    loads_strict,
    parse_event,
    validate_features,
)
from stream.contract.versions import InvalidVersion, ModelVersion, parse_version
from stream.kafka import offsets
from stream.ops.clock import Clock, SystemClock
from stream.ops.metrics import RefreshMetrics, ScorerMetrics
from stream.ops.model_store import ModelStore, ModelStoreError
from stream.ops.settings import Settings, load_settings

log = logging.getLogger(__name__)
SCORE_SCHEMA: Final = 1
OBJECTIVES: Final = ("approval", "activation")


@dataclass(frozen=True)
class ScoringModel:
    """An immutable model version ready to score (eval mode, encoder never updated)."""

    version: int
    model: AITM
    encoder: FeatureEncoder
    created_at_ms: int

    @classmethod
    def from_checkpoint(cls, version: int, ckpt: Mapping[str, Any], created_at_ms: int = 0) -> ScoringModel:
        model = AITM(config_from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["model_state"])
        model.eval()
        return cls(version, model, FeatureEncoder.from_state_dict(ckpt["feature_maps"]), created_at_ms)

    @torch.inference_mode()
    def predict(self, rows: Sequence[Mapping[str, str]]) -> np.ndarray:
        """End-to-end probabilities (N, T) of feature dicts, in funnel order (``funnel_order``):
        what the scores topic and ``POST /score`` publish."""
        ids = torch.from_numpy(self.encoder.encode_dicts(rows))  # (N, F)
        return funnel_order(torch.sigmoid(self.model(ids)).numpy())


@dataclass(frozen=True)
class BankPolicy:
    """Eq. 1 of the paper: each bank's objective (approval or activation) and its weight."""

    default_objective: str = "approval"
    objectives: Mapping[str, str] = field(default_factory=dict)
    default_weight: float = 1.0
    weights: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, s: Settings) -> BankPolicy:
        return cls(
            s.scorer_default_objective,
            dict(s.scorer_bank_objectives),
            s.scorer_default_weight,
            dict(s.scorer_bank_weights),
        )

    def score(self, bank_id: str, probs: np.ndarray) -> tuple[str, float, float]:
        """(objective, weight, weight x y_hat[objective]) for one row of probabilities (T,)."""
        objective = self.objectives.get(bank_id, self.default_objective)
        weight = float(self.weights.get(bank_id, self.default_weight))
        return objective, weight, weight * float(probs[TASKS.index(objective)])


def score_fields(m: ScoringModel, policy: BankPolicy, bank_id: str, probs: np.ndarray) -> dict[str, Any]:
    objective, weight, score = policy.score(bank_id, probs)
    return {
        "model_version": m.version,
        "probabilities": {t: round(float(p), 7) for t, p in zip(TASKS, probs, strict=True)},
        "objective": objective,
        "weight": weight,
        "score": score,
    }


class BadRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_request(body: bytes) -> tuple[str, dict[str, str], str | None]:
    """(bank_id, features, impression_id) of a ``POST /score`` body; ``BadRequest`` (400) if wrong."""
    try:
        obj = loads_strict(body, "request body")
    except InvalidRecord as exc:
        raise BadRequest(400, exc.message) from None
    if not isinstance(obj, dict):
        raise BadRequest(400, 'the body must be a JSON object like {"bank_id": "bank_2", "features": {...}}')
    unknown = set(obj) - {"bank_id", "features", "impression_id"}
    if unknown:
        raise BadRequest(
            400, f"unknown field(s) {sorted(unknown)}; allowed: bank_id, features, impression_id"
        )
    if "features" not in obj:
        raise BadRequest(400, "'features' is required: an object of feature name -> string value")
    try:
        feats = validate_features(obj["features"])
    except InvalidRecord as exc:
        raise BadRequest(400, exc.message) from None
    bank = obj.get("bank_id", "")
    if not isinstance(bank, str) or len(bank) > MAX_ID_LEN:
        raise BadRequest(400, f"'bank_id' must be a string of at most {MAX_ID_LEN} characters")
    iid = obj.get("impression_id")
    if iid is not None and (not isinstance(iid, str) or len(iid) > MAX_ID_LEN):
        raise BadRequest(400, f"'impression_id' must be a string of at most {MAX_ID_LEN} characters")
    return bank, feats, iid


class Scorer:
    """The scorer's state: the model in use, the pending swap, clients, metrics."""

    def __init__(self, settings: Settings, registry: CollectorRegistry, clock: Clock | None = None) -> None:
        self.s = settings
        self.clock = clock or SystemClock()
        self.metrics = ScorerMetrics(registry)
        self.refresh = RefreshMetrics(registry, "scorer", self._model_age)
        self.policy = BankPolicy.from_settings(settings)
        self.store = ModelStore(settings.model_store_path(), settings.model_store_keep)
        self.model: ScoringModel | None = None  # read by HTTP threads; replaced whole, never mutated
        self._next: ScoringModel | None = None
        self._next_lock = threading.Lock()
        self._next_freshness_s: float | None = None
        self.scored = 0
        self._http: ThreadingHTTPServer | None = None
        self._http_latency = self.metrics.latency.labels(path="http")
        self._stream_latency = self.metrics.latency.labels(path="stream")

    def _model_age(self) -> float:
        m = self.model
        return time.time() - m.created_at_ms / 1000 if m is not None and m.created_at_ms else float("nan")

    # --- model refresh --------------------------------------------------------------------------

    def offer(self, ann: ModelVersion) -> bool:
        """Load an announced version (verified) as the next model; False if refused or not newer."""
        current = self._next or self.model
        if current is not None and ann.version <= current.version:
            return False
        try:
            ckpt = self.store.load(path=self.store.root / ann.path.rsplit("/", 1)[-1], sha256=ann.sha256)
            m = ScoringModel.from_checkpoint(ann.version, ckpt, ann.created_at_ms)
        except (ModelStoreError, KeyError, RuntimeError, ValueError) as exc:
            self.metrics.refused_models.inc()
            log.warning("refusing model version %d: %s", ann.version, exc)
            return False
        with self._next_lock:
            self._next = m
            self._next_freshness_s = ann.min_new_sample_consumed_at_ms / 1000
        return True

    def swap_if_ready(self) -> bool:
        """Put the pending version in use (called between batches)."""
        with self._next_lock:
            m, self._next = self._next, None
            fresh_from = self._next_freshness_s
        if m is None:
            return False
        self.model = m
        self.metrics.swaps.inc()
        self.metrics.model_version.set(m.version)
        self.metrics.last_update.set(m.created_at_ms / 1000)
        if fresh_from:
            self.refresh.freshness.observe(max(0.0, self.clock.now_ms() / 1000 - fresh_from))
        log.info("model version %d in use", m.version)
        return True

    def watch_versions(self, stop: threading.Event) -> None:
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
                            self.metrics.refused_models.inc()
                            log.warning("bad model-versions record at offset %d: %s", rec.offset, exc.message)
                for ann in sorted(anns, key=lambda a: -a.version):
                    if self.offer(ann):
                        break
        finally:
            consumer.close()

    # --- stream path ----------------------------------------------------------------------------

    def score_batch(
        self, m: ScoringModel, records: Sequence[Any]
    ) -> tuple[list[tuple[bytes, bytes]], list[tuple[Any, InvalidEvent]]]:
        """Score one polled batch with one model: (key, score record) pairs and bad records."""
        events, bad = [], []
        for rec in records:
            try:
                events.append(parse_event(rec.value or b"", expected_type="impression"))
            except InvalidEvent as exc:
                bad.append((rec, exc))
        out = []
        if events:
            probs = m.predict([e.features or {} for e in events])  # (N, T)
            now_ms = self.clock.now_ms()
            for e, p in zip(events, probs, strict=True):
                rec = {
                    "schema_version": SCORE_SCHEMA,
                    "impression_id": e.impression_id,
                    "bank_id": e.bank_id,
                    **score_fields(m, self.policy, e.bank_id, p),
                    "event_time_ms": e.event_time_ms,
                    "scored_at_ms": now_ms,
                }
                out.append((e.impression_id.encode(), json.dumps(rec, separators=(",", ":")).encode()))
        return out, bad

    def run(self, stop: threading.Event) -> None:
        from kafka import KafkaConsumer, KafkaProducer
        from kafka.errors import CommitFailedError

        cfg = self.s.kafka_python_config()
        producer = KafkaProducer(client_id="aitm-scorer", acks="all", linger_ms=2, enable_idempotence=False, **cfg)
        session = self.s.kafka_session_timeout_ms
        consumer = KafkaConsumer(
            client_id="aitm-scorer",
            group_id=self.s.scorer_group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session,
            heartbeat_interval_ms=max(300, session // 4),
            max_poll_records=self.s.scorer_batch_size,
            **cfg,
        )
        subscribed = False
        lag_at = 0.0
        try:
            while not stop.is_set():
                self.swap_if_ready()  # between batches only
                m = self.model
                if m is None:  # nothing to score with yet: do not take partitions
                    stop.wait(0.05)
                    continue
                if not subscribed:
                    consumer.subscribe([self.s.topic_impressions], listener=_CommitOnRevoke(consumer))
                    subscribed = True
                polled = consumer.poll(timeout_ms=100)
                records = [r for recs in polled.values() for r in recs]
                if time.monotonic() - lag_at >= 1.0:
                    lag_at = time.monotonic()
                    offsets.rewind_sync(consumer)
                    lag = offsets.lag_sync(consumer)
                    if lag is not None:
                        self.metrics.consumer_lag.set(lag)
                if not records:
                    continue
                t0 = time.perf_counter()
                out, bad = self.score_batch(m, records)
                for key, value in out:
                    producer.send(self.s.topic_scores, key=key, value=value)
                for rec, exc in bad:
                    self.metrics.dead_letters.labels(reason=exc.reason).inc()
                    producer.send(
                        self.s.topic_dead_letters,
                        key=rec.key or b"",
                        value=dead_letter(
                            rec.value,
                            source_topic=rec.topic,
                            reason=exc.reason,
                            detail=exc.message,
                            partition=rec.partition,
                            offset=rec.offset,
                            key=rec.key,
                            time_ms=self.clock.now_ms(),
                        ),
                    )
                producer.flush()
                try:
                    consumer.commit()  # offsets only after the scores are out
                except CommitFailedError as exc:  # the group rebalanced meanwhile: these may be rescored
                    log.warning(
                        "offset commit failed (%s): %d records may be scored again", exc, len(records)
                    )
                    self.metrics.commit_failures.inc()
                per_record = (time.perf_counter() - t0) / len(records)
                for _ in out:
                    self._stream_latency.observe(per_record)
                self.metrics.scores.inc(len(out))
                self.scored += len(out)
        finally:
            consumer.close()
            producer.close()

    # --- HTTP -----------------------------------------------------------------------------------

    def http_score(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """The endpoint's logic: (status, JSON body)."""
        try:
            bank, feats, iid = parse_request(body)
        except BadRequest as exc:
            return exc.code, {"error": exc.message}
        m = self.model
        if m is None:
            return 503, {"error": "no model version loaded yet; retry shortly"}
        probs = m.predict([feats])[0]
        out = {"bank_id": bank, **score_fields(m, self.policy, bank, probs)}
        if iid is not None:
            out["impression_id"] = iid
        return 200, out

    def serve_http(self, host: str, port: int) -> ThreadingHTTPServer:
        """Start the HTTP endpoint in a daemon thread; returns the server (``server_address``)."""
        scorer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _reply(self, code: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj, separators=(",", ":")).encode()
                scorer.metrics.http_requests.labels(code=str(code)).inc()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    m = scorer.model
                    self._reply(
                        200 if m else 503,
                        {"status": "ok" if m else "no model", "model_version": m.version if m else None},
                    )
                elif self.path == "/score":
                    self._reply(405, {"error": "use POST /score with a JSON body"})
                else:
                    self._reply(404, {"error": f"no such path {self.path[:60]!r}; use POST /score"})

            def do_POST(self) -> None:
                t0 = time.perf_counter()
                if self.path != "/score":
                    self._drain()
                    self._reply(404, {"error": f"no such path {self.path[:60]!r}; use POST /score"})
                    return
                ctype = self.headers.get("Content-Type", "application/json")
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self.close_connection = True
                    self._reply(411, {"error": "send a Content-Length header"})
                    return
                n = int(length)
                if n > MAX_RECORD_BYTES:
                    self.close_connection = True
                    self._reply(413, {"error": f"body of {n} bytes; at most {MAX_RECORD_BYTES}"})
                    return
                body = self.rfile.read(n)
                if not ctype.startswith("application/json"):
                    self._reply(415, {"error": f"Content-Type {ctype[:40]!r}; send application/json"})
                    return
                code, obj = scorer.http_score(body)
                if code == 200:
                    scorer._http_latency.observe(time.perf_counter() - t0)
                self._reply(code, obj)

            def _drain(self) -> None:
                length = self.headers.get("Content-Length")
                if length and length.isdigit() and int(length) <= MAX_RECORD_BYTES:
                    self.rfile.read(int(length))
                else:
                    self.close_connection = True

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="scorer-http", daemon=True).start()
        self._http = server
        return server

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


def main(argv: list[str] | None = None) -> int:
    """Run the scorer (stream path, model watcher, HTTP endpoint) until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(prog="aitm-stream scorer", description=__doc__)
    p.add_argument("--http-port", type=int, default=None, help="default SCORER_HTTP_PORT")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument("--loglevel", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s scorer %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = load_settings()
    torch.set_num_threads(settings.scorer_threads)
    from stream.kafka.broker import ensure_topics

    ensure_topics(settings.kafka_python_config(), settings.topic_specs(), settings.topic_replication_factor)
    registry = CollectorRegistry()
    if not args.no_metrics:
        start_http_server(settings.metrics_port_scorer, addr=settings.metrics_host, registry=registry)
    scorer = Scorer(settings, registry)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    port = args.http_port if args.http_port is not None else settings.scorer_http_port
    server = scorer.serve_http(settings.scorer_http_host, port)
    log.info("scorer: HTTP on %s:%d, model store %s", *server.server_address[:2], scorer.store.root)
    watcher = threading.Thread(target=scorer.watch_versions, args=(stop,), name="model-versions", daemon=True)
    watcher.start()
    try:
        scorer.run(stop)
    finally:
        stop.set()
        scorer.close()
        watcher.join(timeout=5)
    return 0


class _CommitOnRevoke(AsyncConsumerRebalanceListener):
    """Commits what was scored before partitions move to another scorer, so none is rescored.

    kafka-python runs rebalance callbacks on its IO thread, where the blocking ``commit()`` is not
    allowed: this awaits the coordinator's commit coroutine instead.
    """

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        from kafka.errors import KafkaError

        if not revoked:
            return
        try:
            offsets = self.consumer._subscription.all_consumed_offsets()
            await self.consumer._coordinator._commit_offsets_sync_async(offsets)
        except (KafkaError, AttributeError) as exc:
            log.warning("commit before rebalance failed (records may be rescored): %s", exc)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("scoring partitions %s", sorted(tp.partition for tp in assigned))
