"""``aitm-stream trainer``: consume ``samples``, test-then-train AITM, checkpoint, announce versions.

A kafka-python consumer with no group: it assigns every partition of the samples topic and seeks
to the offsets stored in the last good training checkpoint (the beginning when there is none), so
a restarted trainer - even after ``kill -9`` - trains again on every sample after that checkpoint
and never trusts a group commit. Two cadences: a model version every
``TRAINER_CHECKPOINT_INTERVAL_MS`` (its serving artifact - a delta of the rows changed, every
``MODEL_STORE_FULL_EVERY`` a full snapshot - announced on ``model-versions``), and a training
checkpoint (everything a resume needs, offsets included: the only place they are kept) with the
version due every ``TRAINER_TRAINING_CHECKPOINT_INTERVAL_MS`` and at a clean stop. A restart
resumes from the last training checkpoint (older than the last version) and numbers its versions
on from the highest in the store. CPU-heavy torch work runs in this process only. See
docs/streaming.md and docs/embedding_table.md.
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import threading
import time
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry, start_http_server

from aitm.checkpoint import config_from_dict, load_checkpoint, make_checkpoint, snapshot
from aitm.embedding_table import DynamicTable, Encoder, encoder_from_state
from aitm.model import AITM
from aitm.train import pick_device
from stream.contract.events import dead_letter
from stream.contract.versions import ModelVersion
from stream.learn.batcher import Batch, Batcher
from stream.learn.device import DevicePath
from stream.learn.feed import Invalid, SampleFeed
from stream.learn.gauges import TableGauges, set_quality_gauges
from stream.learn.learner import OnlineLearner, fields_of, model_options
from stream.learn.publication_gate import (
    DAY_MS,
    REASONS,
    HoldoutSet,
    Known,
    PublicationGate,
    settled_after_ms,
)
from stream.learn.publisher import Publisher
from stream.learn.ranks import RankInfo
from stream.learn.refresh import ServingWriter
from stream.learn.sample_batch import SampleBatch
from stream.learn.stabilisers import stabilisers_from
from stream.ops.clock import Clock, SystemClock
from stream.ops.command import add_loglevel, command_parser
from stream.ops.jsonsafe import finite
from stream.ops.lease import WriterLease
from stream.ops.metrics import RefreshMetrics, TrainerMetrics, process_registry
from stream.ops.model_store import ModelStore
from stream.ops.settings import Settings, kafka_client_config, load_settings

log = logging.getLogger(__name__)
# quality gauges (exact window AUCs: sorts of 20k pairs per task and evaluator) are refreshed this
# often, the Prometheus scrape interval; throughput and lag every second
QUALITY_REFRESH_S = 5.0


def known_now(encoder: Encoder) -> Known:
    """Maps ids the encoder gives from now on to out-of-vocabulary (for the version served now)."""
    return partial(encoder.known_as_of, marker=encoder.marker())


class Trainer:
    """The trainer process's state: consumer, learner, store, producer and metrics."""

    def __init__(self, settings: Settings, registry: CollectorRegistry, clock: Clock | None = None,
                 mode: str | None = None) -> None:
        self.s = settings
        self.clock = clock or SystemClock()
        self.mode = mode or settings.trainer_mode
        self.metrics = TrainerMetrics(registry)
        self.table_gauges = TableGauges(self.metrics)
        self.published_at_s = 0.0  # before the model-age gauge: /metrics may be scraped while we start
        self.refresh = RefreshMetrics(registry, "trainer", self._model_age)
        self.store = ModelStore(settings.model_store_path(), settings.model_store_keep,
                                settings.model_store_keep_checkpoints)
        self.device = pick_device(settings.trainer_device)
        self.gate = PublicationGate(HoldoutSet(settled_after_ms(settings), settings.trainer_holdout_window),
                                    settings.trainer_gate_min_rows, settings.trainer_gate_log_loss_margin,
                                    settings.trainer_gate_calibration_margin, self.device)
        for reason in REASONS:
            self.metrics.refused_versions.labels(reason=reason)
        self.refused = 0  # candidate versions the gate did not publish
        self.learner: OnlineLearner | None = None
        self.offsets: dict[int, int] = {}  # partition -> next offset to consume (trained or dead-lettered)
        self.version = 0
        self.ckpt_version = 0  # the version of the last training checkpoint (written or being written)
        self.last_training_ckpt_s = time.monotonic()
        self.uncheckpointed = False  # a version was announced since the last training checkpoint
        self.new_min_ms: int | None = None  # consumed-at of the oldest sample not yet in a version
        self.new_max_ms = 0
        self.batches_since = 0
        self.consumed = 0
        self.dead = 0
        self.busy_s = 0.0  # seconds inside test-then-train steps
        self.first_record_s: float | None = None
        self.last_train_s = 0.0
        self.batcher: Batcher | None = None  # made by run()
        self._feed: SampleFeed | None = None
        self.publisher = Publisher(self.store, settings.topic_model_versions, lambda: self._producer, self.clock,
                                   self._published, self._checkpointed)
        self._producer: Any = None
        self.serving = ServingWriter(settings.model_store_full_every)  # the scorers' artifacts

    # --- start-up: resume, warm start or cold ---------------------------------------------------

    @property
    def lingered_s(self) -> float:
        """Seconds partial batches waited (TRAINER_LINGER_MS) with nothing new to read."""
        return self.batcher.lingered_s if self.batcher is not None else 0.0

    def update_quality_gauges(self) -> None:
        if self.learner is not None:
            set_quality_gauges(self.metrics, self.learner, self.gate)
            self.table_gauges.refresh(self.learner.encoder)

    def _model_age(self) -> float:
        return time.time() - self.published_at_s if self.published_at_s else float("nan")

    def _learner_from(self, ckpt: dict[str, Any]) -> OnlineLearner:
        model = AITM(config_from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["model_state"])
        encoder = encoder_from_state(ckpt["feature_maps"])
        learner = OnlineLearner(encoder, self.mode, self.s.trainer_lr, self.device, self.s.trainer_eval_window,
                                model=model, freeze_after_ms=self._freeze_after_ms(), one_pass=self.s.trainer_one_pass,
                                stabilisers=stabilisers_from(self.s), alpha=self.s.trainer_calibrator_alpha)
        return self._on_device(learner)

    def restore(self) -> None:
        """Resume from the newest good version in the store, else warm-start, else wait for data."""
        # never reuse a number: versions after the last training checkpoint were announced too
        self.version = self.store.latest_version()
        latest = self.store.load_latest()
        if latest is not None:
            v, ckpt = latest
            self.ckpt_version = v
            extra = ckpt.get("extra", {})
            self.learner = self._learner_from(ckpt)
            if extra.get("topic") == self.s.topic_samples and "learner" in extra:
                self.learner.load_state_dict(self._resume_state(extra))
                self.offsets = {int(p): int(o) for p, o in extra.get("offsets", {}).items()}
                if extra.get("holdout") is not None:
                    self.gate.holdout.load_state_dict(extra["holdout"])
                # the version resumed from is the one being served
                self.gate.published(v, self.learner.served_model(), known_now(self.learner.encoder))
                log.info("resumed from model version %d (its training checkpoint) at offsets %s; next version %d",
                         v, self.offsets, self.version + 1)
            else:
                log.info("model version %d is from another topic: used as a warm start", v)
            return
        if self.s.trainer_warm_start is not None:
            ckpt = load_checkpoint(self.s.trainer_warm_start)
            self.learner = self._learner_from(ckpt)
            self._keep_stream_clock(ckpt)
            log.info("warm start from %s", self.s.trainer_warm_start)

    def _keep_stream_clock(self, ckpt: dict[str, Any]) -> None:
        """A warm start from a version of this trainer on the same samples topic keeps the stream's
        start and its delay fits: the stream is not young again, whatever the new process is."""
        extra = ckpt.get("extra", {})
        state = extra.get("learner") if extra.get("topic") == self.s.topic_samples else None
        if self.learner is None or not isinstance(state, dict):
            return
        self.learner.stream_start_ms = state.get("stream_start_ms")
        if self.learner.delay is not None and state.get("delay") is not None:
            self.learner.delay.load_state_dict(state["delay"])

    def _on_device(self, learner: OnlineLearner) -> OnlineLearner:
        """The learner's device path with TRAINER_AMP (stream/learn/device.py)."""
        learner.io = DevicePath(self.device, self.s.trainer_amp)
        return learner

    def _resume_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The learner state a resume loads from a checkpoint's ``extra`` (a rank: its own part)."""
        state: dict[str, Any] = extra["learner"]
        return state

    def _extra_state(self) -> dict[str, Any]:
        """More for a checkpoint's ``extra`` (several ranks: every rank's own learner state)."""
        return {}

    def _cold_start(self, batch: SampleBatch) -> OnlineLearner:
        return self._new_learner(fields_of(batch))

    def _new_learner(self, fields: tuple[str, ...]) -> OnlineLearner:
        encoder = DynamicTable(fields, self.s.trainer_embedding_rows, self.s.trainer_feature_min_count,
                               self.s.trainer_embedding_ttl_ms)
        log.info("cold start: %d feature fields %s", len(fields), ", ".join(fields))
        learner = OnlineLearner(encoder, self.mode, self.s.trainer_lr, self.device, self.s.trainer_eval_window,
                                freeze_after_ms=self._freeze_after_ms(), one_pass=self.s.trainer_one_pass,
                                stabilisers=stabilisers_from(self.s), alpha=self.s.trainer_calibrator_alpha,
                                **model_options(self.s))
        return self._on_device(learner)

    def _freeze_after_ms(self) -> int | None:
        days = self.s.trainer_freeze_after_days
        return round(days * DAY_MS) if days > 0 else None

    # --- Kafka ----------------------------------------------------------------------------------

    def connect(self) -> None:
        """The producer (announcements, dead letters) and the samples feed, positioned at ``offsets``."""
        from kafka import KafkaProducer

        self._producer = KafkaProducer(
            client_id="aitm-trainer", acks="all", linger_ms=5, enable_idempotence=False, **self.s.kafka_python_config()
        )
        feed = SampleFeed(partial(kafka_client_config, self.s, "aiokafka"), self.s.topic_samples, self.offsets,
                          chunk_size=self.s.trainer_batch_size)
        feed.start_and_wait()
        self._feed = feed

    def close(self) -> None:
        self.publisher.close()  # a version (and a checkpoint) being written is finished and announced
        if self._feed is not None:
            self._feed.close()
        if self._producer is not None:
            self._producer.close()

    # --- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event, exit_when_idle_s: float | None = None) -> None:
        """Batch the feed's chunks, test-then-train each batch, checkpoint, refresh the gauges.

        The feed fetches and parses in its own process while this one trains; a chunk holds at
        most one batch of records, so batches are full while there is a backlog."""
        feed = self._feed
        if feed is None:
            raise RuntimeError("connect() first")
        batcher = self.batcher = Batcher(self.s.trainer_batch_size, self.s.trainer_linger_ms)
        last_ckpt = last_gauges = idle_since = time.monotonic()
        last_quality = 0.0
        trained_at_last_gauge = self.learner.trained_samples if self.learner else 0
        while not stop.is_set():
            chunk = feed.get(timeout_s=0.1)
            now_ms = self.clock.now_ms()
            if chunk is not None:
                self._intake(chunk)
                self._train(batcher.overflow(chunk, now_ms))
                batcher.add(chunk, now_ms, time.monotonic())
            now = time.monotonic()
            self._train(batcher.due(now_ms, now))
            self.offsets.update(batcher.settled_offsets())  # every consumed record trained or dead-lettered
            if chunk is not None or batcher.n:
                idle_since = now
            due = (now - last_ckpt) * 1000 >= self.s.trainer_checkpoint_interval_ms
            if self.new_min_ms is not None and not batcher.n and (due or self.batches_since >= self.s.trainer_checkpoint_batches):
                self.checkpoint_async()  # or refused by the gate: the next candidate comes an interval later
                last_ckpt = time.monotonic()
            if now - last_gauges >= 1.0:
                if self.learner is not None:
                    done = self.learner.trained_samples
                    self.metrics.throughput.set((done - trained_at_last_gauge) / (now - last_gauges))
                    self.table_gauges.refresh(self.learner.encoder)
                    trained_at_last_gauge = done
                    if now - last_quality >= QUALITY_REFRESH_S:
                        self.update_quality_gauges()
                        last_quality = now
                last_gauges = now
                self.update_lag_gauge()
            if exit_when_idle_s is not None and self.consumed and not batcher.n and now - idle_since >= exit_when_idle_s:
                break  # armed by the first record, so a slow upstream start is not "idle"
        if batcher.n:
            self._train(batcher.take(self.clock.now_ms()))
        self.final_checkpoint()
        self.update_quality_gauges()
        self.update_lag_gauge()

    def update_lag_gauge(self) -> None:
        """Samples behind the high watermark (from fetch responses), not yet trained on."""
        lag = self._feed.lag(self.offsets) if self._feed is not None else None
        if lag is not None:
            self.metrics.consumer_lag.set(lag)

    def _train(self, ready: Batch | None) -> None:
        """Test-then-train one batch, then take its offsets as safe to resume from."""
        if ready is None:
            return
        if not ready.parts:  # only dead letters or empty chunks: nothing to train
            self.offsets.update(ready.offsets)
            return
        self._step(SampleBatch.concat(ready.parts), ready.first_at_ms, ready.last_at_ms, ready.keys)
        self.offsets.update(ready.offsets)

    def _step(self, batch: SampleBatch, first_at_ms: int, last_at_ms: int, order: np.ndarray | None = None) -> None:
        if self.learner is None:
            self.learner = self._cold_start(batch)
        t0 = time.perf_counter()
        res = self.learner.step(batch, order=order)
        dt = time.perf_counter() - t0
        self.busy_s += dt
        self.last_train_s = time.monotonic()
        self.metrics.batch_seconds.observe(dt)
        self.metrics.trained.inc(res.trained_rows)
        if len(res.holdout_rows):
            done = self.learner.last_batch
            rows = res.holdout_rows
            self.gate.holdout.add([done.impression_ids[i] for i in rows.tolist()], res.holdout_ids, done.labels[rows],
                                  done.event_time_ms[rows], int(done.watermark_ms.max()))
        self.batches_since += 1
        self.new_min_ms = first_at_ms if self.new_min_ms is None else self.new_min_ms
        self.new_max_ms = last_at_ms

    def _intake(self, chunk: Any) -> None:
        """A fetched chunk's bookkeeping: when the first record came, samples consumed and counted
        by kind, its invalid records dead-lettered."""
        if self.first_record_s is None:
            self.first_record_s = chunk.fetched_at_s
        self.consumed += len(chunk)
        for kind, n in chunk.kinds.items():
            self.metrics.samples.labels(kind=kind).inc(n)
        for bad in chunk.invalid:
            self._dead_letter(bad)

    def _dead_letter(self, rec: Invalid) -> None:
        self.dead += 1
        self.metrics.dead_letters.labels(reason=rec.reason).inc()
        value = dead_letter(rec.value, source_topic=rec.topic, reason=rec.reason, detail=rec.detail,
                            partition=rec.partition, offset=rec.offset, key=rec.key, time_ms=self.clock.now_ms())
        self._producer.send(self.s.topic_dead_letters, key=rec.key or b"", value=value)

    def checkpoint(self, training: bool = False) -> ModelVersion | None:
        """Write the next version and announce it (``training``: with a training checkpoint, whatever
        the cadence); returns once it is announced (None when the publication gate refused it)."""
        pending = self.checkpoint_async(training)
        return pending.result() if pending is not None else None

    def final_checkpoint(self) -> None:
        """At a clean stop: the last version, and a training checkpoint of the state reached, so a
        restart re-reads nothing; then until everything is written."""
        if self.new_min_ms is not None and self.learner is not None:
            self.checkpoint(training=True)
        self.checkpoint_rest()

    def checkpoint_rest(self) -> None:
        """At a clean stop, after the last version: when versions were announced since the last
        training checkpoint and nothing was trained since the last one, that version's training
        state (the current one) is written; then until everything is written."""
        if self.learner is not None and self.uncheckpointed and self.new_min_ms is None:
            self.ckpt_version, self.uncheckpointed = self.version, False
            self.publisher.checkpoint_only(self.version, self._training_checkpoint(self.learner.served_model()))
        self.publisher.wait_all()

    def _training_due(self) -> bool:
        every = self.s.trainer_training_checkpoint_interval_ms
        return every == 0 or (time.monotonic() - self.last_training_ckpt_s) * 1000 >= every

    def _training_checkpoint(self, served: Any) -> dict[str, Any]:
        """The training checkpoint of the current state (a snapshot: tensors cloned), with the
        offsets it covers: a restart resumes from exactly here."""
        learner = self.learner
        assert learner is not None
        self.last_training_ckpt_s = time.monotonic()
        extra = {
            "topic": self.s.topic_samples,
            "offsets": dict(self.offsets),
            "learner": learner.state_dict(),
            "mode": self.mode,
            "holdout": self.gate.holdout.state_dict(),
            **self._extra_state(),
        }
        # the checkpoint's model is the served one (the weight average); the trained weights are
        # in the learner state, for a resume. A dynamic table's state is made of fresh copies
        # already: walking its vocabulary again (millions of entries) would only cost time here
        encoder = learner.encoder.state_dict()
        ckpt: dict[str, Any] = snapshot(make_checkpoint(served, learner.model.config, {}, self.version, extra))
        ckpt["feature_maps"] = encoder if isinstance(learner.encoder, DynamicTable) else snapshot(encoder)
        return ckpt

    def checkpoint_async(self, training: bool = False) -> Future[ModelVersion] | None:
        """Judge the candidate (the publication gate), then snapshot the next version here - its
        serving artifact (``ServingWriter``) and, when due (or ``training``), the training
        checkpoint (served model, encoder, optimizer, learner state, offsets) - and write and
        announce it on the writer threads while training goes on (``Publisher``): a version costs
        the loop only its snapshots (``aitm_trainer_publish_stall_seconds``). A training checkpoint
        falls due every ``TRAINER_TRAINING_CHECKPOINT_INTERVAL_MS``; while the previous one (or a
        full snapshot) is still being written it waits for a later version. One version is in
        flight at a time; a failed write raises here, at the next checkpoint. A refused candidate is
        counted and logged, and nothing is written: a restart resumes from the last training
        checkpoint."""
        learner = self.learner
        if learner is None:
            raise RuntimeError("nothing to checkpoint before the first batch")
        t0 = time.perf_counter()
        served = learner.served_model()
        verdict = self.gate.judge(served)
        if not verdict.publish:
            self.refused += 1
            self.metrics.refused_versions.labels(reason=verdict.reason or "other").inc()
            log.warning("candidate for version %d not published (%s): %s", self.version + 1, verdict.reason,
                        verdict.detail)
            return None
        self.publisher.wait()  # in order, and a failure surfaces
        self.version += 1
        busy = self.publisher.background_busy()
        artifacts = self.serving.artifacts(self.version, served, learner.encoder, learner.take_changed_rows(),
                                           postpone_full=busy)
        ckpt = None
        every = self.s.trainer_training_checkpoint_interval_ms
        if not artifacts or training or every == 0 or (self._training_due() and not busy):
            ckpt = self._training_checkpoint(served)
            self.ckpt_version = self.version
        self.uncheckpointed = ckpt is None
        self.gate.published(self.version, served, known_now(learner.encoder))
        newest_ms = self.new_max_ms
        oldest_ms = self.new_min_ms
        trained = learner.trained_samples
        self.new_min_ms, self.batches_since = None, 0
        pending = self.publisher.submit(self.version, ckpt, trained, newest_ms, oldest_ms, artifacts)
        self.metrics.publish_stall.observe(time.perf_counter() - t0)
        return pending

    def _checkpointed(self, version: int, size: int) -> None:
        """On a writer thread, once the training checkpoint of ``version`` is written."""
        self.metrics.training_checkpoints.inc()
        self.metrics.version_bytes.labels(kind="checkpoint").set(size)

    def _published(self, v: ModelVersion, now_ms: int) -> None:
        """On the writer thread, once ``v`` is announced: the refresh figures."""
        self.refresh.freshness.observe(max(0.0, (now_ms - v.min_new_sample_consumed_at_ms) / 1000))
        self.published_at_s = time.time()
        self.metrics.checkpoints.inc()
        self.metrics.model_version.set(v.version)
        for kind, size in self.publisher.artifact_bytes.items():
            self.metrics.version_bytes.labels(kind=kind).set(size)
        self.metrics.last_update.set(self.published_at_s)

    def summary(self, wall_s: float) -> dict[str, Any]:
        learner = self.learner
        return {
            "mode": self.mode,
            "records_consumed": self.consumed,
            "dead_letters": self.dead,
            "samples_processed": learner.samples_seen if learner else 0,
            "trained_rows": learner.trained_samples if learner else 0,
            "busy_seconds": round(self.busy_s, 3),
            # from the first record consumed to the last batch trained: the throughput denominator
            # less the lingering of partial batches, idle time (the tail of a backlog waits up to
            # TRAINER_LINGER_MS for samples that are not coming)
            "active_seconds": round(self.last_train_s - self.first_record_s - self.lingered_s, 3)
            if self.first_record_s else 0.0,
            "lingered_seconds": round(self.lingered_s, 3),
            "wall_seconds": round(wall_s, 3),
            # CPU seconds (user + system) of this process and of its reaped children (the feed)
            "cpu_seconds": {"trainer": _cpu_s(resource.RUSAGE_SELF), "feed": _cpu_s(resource.RUSAGE_CHILDREN)},
            "version": self.version,
            "refused_versions": self.refused,
            "device": str(self.device),
            "quality": learner.metric_values() if learner else None,
            "frozen_quality": learner.frozen_metric_values() if learner else None,
        }


def main(argv: list[str] | None = None) -> int:
    """Run the trainer until SIGTERM/SIGINT (or until idle, with ``--exit-when-idle``)."""
    p = command_parser("trainer")
    p.add_argument("--mode", choices=("fnw", "final-only"), default=None, help="default TRAINER_MODE")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default TRAINER_DEVICE)")
    p.add_argument("--warm-start", type=Path, default=None, help="offline checkpoint (default TRAINER_WARM_START)")
    p.add_argument("--exit-when-idle", type=float, default=None, metavar="S",
                   help="checkpoint and exit after S seconds without new samples (benches, batch runs)")
    p.add_argument("--summary-json", type=Path, default=None, help="write a run summary here on exit")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    add_loglevel(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s trainer %(levelname)s %(message)s")
    overrides: dict[str, Any] = {}
    if args.device:
        overrides["trainer_device"] = args.device
    if args.warm_start:
        overrides["trainer_warm_start"] = args.warm_start
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = load_settings(**overrides)
    ranks = RankInfo.from_env()
    if ranks.ranks > 1:  # under torchrun: one rank of several (stream/learn/rank_trainer.py)
        from stream.learn.rank_trainer import main_rank

        return main_rank(settings, ranks, args.mode, args.exit_when_idle, args.summary_json, args.no_metrics)
    torch.set_num_threads(settings.trainer_threads)
    _warm_up_torch()
    from stream.kafka.broker import ensure_topics

    ensure_topics(settings.kafka_python_config(), settings.topic_specs(), settings.topic_replication_factor,
                  settings.kafka_connect_timeout_s)
    registry = process_registry()
    if not args.no_metrics:
        start_http_server(settings.metrics_port_trainer, addr=settings.metrics_host, registry=registry)
    trainer = Trainer(settings, registry, mode=args.mode)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # one writer per model store: a second trainer waits here as a standby (stream/ops/lease.py)
    lease = WriterLease(trainer.store.root)
    trainer.metrics.writer_lease.set(0)
    if not lease.wait(stop):
        return 0
    trainer.metrics.writer_lease.set(1)
    trainer.restore()
    trainer.connect()
    t0 = time.monotonic()
    log.info("trainer: mode %s, device %s, model store %s", trainer.mode, trainer.device, trainer.store.root)
    try:
        trainer.run(stop, args.exit_when_idle)
    finally:
        trainer.close()
        lease.release()
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary = finite(trainer.summary(time.monotonic() - t0))
        args.summary_json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return round(r.ru_utime + r.ru_stime, 3)


def _warm_up_torch() -> None:
    """Pay torch's one-off costs before the first record: the first optimizer imports
    ``torch._dynamo`` (over a second), the first backward starts autograd."""
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([w], fused=True)
    (w * 2).sum().backward()
    opt.step()
