"""``aitm-stream scorer``: score impressions onto ``scores``, follow ``model-versions``, serve HTTP.

- Stream path: a kafka-python consumer in group ``SCORER_GROUP_ID`` (scorers scale out by
  partitions) reads impressions; each polled batch is scored with *one* model version, the
  scores are produced and flushed, and only then are the offsets committed. A new version is
  swapped in between batches, so no impression is dropped or scored twice by a swap (a crash can
  still repeat a batch: at-least-once; the scores carry the impression id to dedupe on).
- Model refresh (``stream.serve.versions``): a watcher thread reads ``model-versions`` from the
  beginning, loads the newest announced version (sha256 of the file and the checkpoint's own
  checksum verified) and hands it to the loop; a version that fails is refused, counted, and the
  current one stays in use.
- HTTP (``stream.serve.http``, aiohttp): ``POST /score`` with ``{"features": {...}, "bank_id":
  "bank_2"}`` returns the four probabilities, the bank's objective, weight and score
  (``stream.serve.scoring``, as on the stream path); ``POST /score/batch`` with ``{"requests":
  [...]}`` scores many with one version; ``GET /livez``, ``GET /readyz`` (a verified version loaded).

Score record (``stream.contract.scores``; JSON, ``schema_version`` 1; key = impression id)::

    {"schema_version": 1, "impression_id": "i-42", "bank_id": "bank_2", "model_version": 7,
     "probabilities": {"click": 0.21, "application": 0.02, "approval": 0.013, "activation": 0.009},
     "objective": "approval", "weight": 1.0, "score": 0.013,
     "event_time_ms": 1767225600000, "scored_at_ms": 1767225600123}
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from kafka import AsyncConsumerRebalanceListener
from prometheus_client import CollectorRegistry, start_http_server

from stream.contract.events import InvalidEvent, dead_letter, parse_event
from stream.contract.scores import encode_score, score_record
from stream.kafka import offsets
from stream.ops.clock import Clock, SystemClock
from stream.ops.command import add_loglevel, command_parser
from stream.ops.metrics import RefreshMetrics, ScorerMetrics, process_registry
from stream.ops.model_store import ModelStore
from stream.ops.settings import Settings, load_settings
from stream.serve.fastpath import Accelerator
from stream.serve.http import BadRequest, HttpServer, Item, parse_batch, parse_request, serve_http
from stream.serve.scoring import BankPolicy, ScoringModel, score_fields
from stream.serve.versions import VersionFollower

log = logging.getLogger(__name__)


class Scorer:
    """The scorer's state: the model in use, the pending swap, clients, metrics."""

    def __init__(self, settings: Settings, registry: CollectorRegistry, clock: Clock | None = None) -> None:
        self.s = settings
        self.clock = clock or SystemClock()
        self.metrics = ScorerMetrics(registry)
        self.refresh = RefreshMetrics(registry, "scorer", self._model_age)
        self.policy = BankPolicy.from_settings(settings)
        self.store = ModelStore(settings.model_store_path(), settings.model_store_keep,
                                settings.model_store_keep_checkpoints)
        self.model: ScoringModel | None = None  # read by HTTP threads; replaced whole (deltas: under its lock)
        self.versions = VersionFollower(settings, self.store, self.metrics.refused_models, self.metrics)
        self.scored = 0
        self.fast = Accelerator(settings.scorer_http_engine)  # HTTP only: onnxruntime copy per version
        self._http: HttpServer | None = None
        self.http_latency = self.metrics.latency.labels(path="http")
        self.http_batch_latency = self.metrics.latency.labels(path="http_batch")
        self._stream_latency = self.metrics.latency.labels(path="stream")

    def _model_age(self) -> float:
        m = self.model
        return time.time() - m.created_at_ms / 1000 if m is not None and m.created_at_ms else float("nan")

    def swap_if_ready(self) -> bool:
        """Put the pending version in use (called between batches)."""
        taken = self.versions.take()
        if taken is None:
            return False
        m, fresh_from = taken
        self.model = m
        self.metrics.swaps.inc()
        self.metrics.model_version.set(m.version)
        self.metrics.last_update.set(m.created_at_ms / 1000)
        if fresh_from:
            self.refresh.freshness.observe(max(0.0, self.clock.now_ms() / 1000 - fresh_from))
        log.info("model version %d in use", m.version)
        return True

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
                rec = score_record(e.impression_id, e.bank_id, score_fields(m, self.policy, e.bank_id, p),
                                   e.event_time_ms, now_ms)
                out.append((e.impression_id.encode(), encode_score(rec)))
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
        guard = offsets.RecreatedGuard()
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
                    offsets.rewind_sync(consumer, guard)
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

    def http_score(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """``POST /score``'s logic: (status, JSON body)."""
        try:
            item = parse_request(body)
        except BadRequest as exc:
            return exc.code, {"error": exc.message}
        code, out = self.score_items([item])
        return (code, out[0]) if isinstance(out, list) else (code, out)

    def http_score_batch(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """``POST /score/batch``: every item scored by one model version, in request order."""
        try:
            items = parse_batch(body, self.s.scorer_http_max_batch, self.s.scorer_http_max_batch_bytes)
        except BadRequest as exc:
            return exc.code, {"error": exc.message}
        code, out = self.score_items(items)
        if not isinstance(out, list):
            return code, out
        return 200, {"model_version": out[0]["model_version"], "results": out}

    def score_items(self, items: Sequence[Item]) -> tuple[int, list[dict[str, Any]] | dict[str, Any]]:
        """Score parsed requests with one model version in one forward pass: (200, an answer per
        item, in order) or (503, the error) before the first version."""
        m = self.model
        if m is None:
            return 503, {"error": "no model version loaded yet; retry shortly"}
        probs = self.fast.predict(m, [feats for _, feats, _ in items])  # (N, T)
        self.metrics.http_impressions.inc(len(items))
        return 200, [self._answer(m, bank, iid, p) for (bank, _, iid), p in zip(items, probs, strict=True)]

    def _answer(self, m: ScoringModel, bank: str, iid: str | None, probs: Any) -> dict[str, Any]:
        out = {"bank_id": bank, **score_fields(m, self.policy, bank, probs)}
        if iid is not None:
            out["impression_id"] = iid
        return out

    def serve_http(self, host: str, port: int) -> HttpServer:
        """Start the HTTP endpoint in its own thread; returns the server (``server_address``)."""
        self._http = serve_http(self, host, port, access_log=self.s.scorer_http_access_log,
                                max_batch_bytes=self.s.scorer_http_max_batch_bytes)
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None


def main(argv: list[str] | None = None) -> int:
    """Run the scorer (stream path, model watcher, HTTP endpoint) until SIGTERM/SIGINT."""
    p = command_parser("scorer")
    p.add_argument("--http-port", type=int, default=None, help="default SCORER_HTTP_PORT")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    add_loglevel(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s scorer %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = load_settings()
    torch.set_num_threads(settings.scorer_threads)
    from stream.kafka.broker import ensure_topics

    ensure_topics(settings.kafka_python_config(), settings.topic_specs(), settings.topic_replication_factor,
                  settings.kafka_connect_timeout_s)
    registry = process_registry()
    if not args.no_metrics:
        start_http_server(settings.metrics_port_scorer, addr=settings.metrics_host, registry=registry)
    scorer = Scorer(settings, registry)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    port = args.http_port if args.http_port is not None else settings.scorer_http_port
    server = scorer.serve_http(settings.scorer_http_host, port)
    log.info("scorer: HTTP on %s:%d, model store %s", *server.server_address[:2], scorer.store.root)
    watcher = threading.Thread(target=scorer.versions.watch, args=(stop,), name="model-versions", daemon=True)
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
