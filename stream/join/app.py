"""``aitm-stream joiner``: the faust app that joins the five event topics into training samples.

faust's consumer reads the co-partitioned event topics and hands them, a fetched batch at a
time, straight to the join (``stream.kafka.faust_bulk``, past faust's per-event agent path; the
agent only subscribes the topics); aiokafka builds the fetched records a record batch at a time
(``stream.kafka.lean_fetch``). Per-impression funnel state lives in a faust Table (``store="rocksdb://"``,
rocksdict) whose changelog restores it after a restart. The records drive
``stream.join.driver.FunnelJoin``: one table write per event at most, state values in a
versioned struct codec (``stream.join.state_codec``), samples and dead letters only when due. Outputs and changelog records are
produced as record batches (``stream.kafka.sender.BatchSender``) once per
``JOINER_SWEEP_INTERVAL_MS``, when every partition whose topic watermarks (lanes) moved is
swept, by the flush/ack protocol of ``stream.join.flusher``; a timer does the same in quiet
spells. The table partitions are ``stream.join.faust_store.FaustTableStore``s. Each flush also tells the join which topic
partitions are read to their end (so a silent one can be idle). The expiry index is in memory
per lane and partition (rebuilt from the local RocksDB on the first record of a partition).
See docs/joiner.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from stream.join.driver import FunnelJoin, JoinTopics
from stream.join.faust_store import FaustTableStore
from stream.join.flusher import Flusher
from stream.join.funnel import Dues, FunnelConfig, Swept, next_dues
from stream.join.state_codec import decode_state
from stream.kafka import lean_fetch, offsets
from stream.kafka.faust_bulk import bulk_consumer, member_lost
from stream.ops.clock import Clock, SystemClock
from stream.ops.command import add_loglevel, command_parser
from stream.ops.heap import collect_young_less_often, freeze_long_lived, switch_gil_sooner
from stream.ops.metrics import JoinerMetrics, process_registry
from stream.ops.settings import Settings, load_settings

log = logging.getLogger(__name__)


def funnel_config(settings: Settings) -> FunnelConfig:
    return FunnelConfig(
        windows_ms=(
            settings.joiner_window_click_ms,
            settings.joiner_window_application_ms,
            settings.joiner_window_approval_ms,
            settings.joiner_window_activation_ms,
        ),
        grace_ms=settings.joiner_grace_ms,
        observe_ms=settings.joiner_observe_ms,
        retention_ms=settings.joiner_retention_ms,
        policy=settings.joiner_policy,
        skew_ms=settings.joiner_clock_skew_ms,
    )


def join_topics(settings: Settings) -> JoinTopics:
    ev = tuple(settings.event_topics().values())
    return JoinTopics(
        (ev[0], ev[1], ev[2], ev[3], ev[4]), settings.topic_samples, settings.topic_dead_letters,
        settings.samples_encoding,
    )


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def _faust_broker_kwargs(settings: Settings) -> dict[str, Any]:
    import faust

    urls = ";".join(f"kafka://{h.strip()}" for h in settings.bootstrap().split(","))
    kw: dict[str, Any] = {"broker": urls}
    proto = settings.kafka_security_protocol
    if proto == "PLAINTEXT":
        return kw
    cfg = settings.aiokafka_config()
    if proto.startswith("SASL"):
        kw["broker_credentials"] = faust.SASLCredentials(
            username=cfg["sasl_plain_username"],
            password=cfg["sasl_plain_password"],
            mechanism=cfg["sasl_mechanism"],
            ssl_context=cfg.get("ssl_context"),
        )
    else:
        kw["broker_credentials"] = faust.SSLCredentials(cfg["ssl_context"])
    return kw


def build_app(settings: Settings, registry: CollectorRegistry, clock: Clock | None = None) -> tuple[Any, FunnelJoin]:
    """The faust app with its table, agent and gauge timer, and the join it drives."""
    import faust

    clock = clock or SystemClock()
    metrics = JoinerMetrics(registry)
    cfg = funnel_config(settings)
    topics = join_topics(settings)
    datadir = Path(settings.data_dir) / "joiner"
    session_s = settings.kafka_session_timeout_ms / 1000.0
    flusher_box: list[Flusher] = []

    class JoinerApp(faust.App):
        async def on_stop(self) -> None:
            """Before faust stops the fetcher, the consumer (its last commit, leaving the group)
            and the tables: no flush from now on, and the one in flight completes (see
            ``stream.join.flusher``)."""
            for flusher in flusher_box:
                await flusher.close()
            await super().on_stop()

    app = JoinerApp(
        settings.joiner_app_id,
        **_faust_broker_kwargs(settings),
        store="rocksdb://",
        datadir=str(datadir),
        topic_partitions=settings.event_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        broker_session_timeout=session_s,
        broker_heartbeat_interval=max(0.5, session_s / 4),
        broker_request_timeout=max(30.0, session_s * 2),
        recovery_consistency_check=settings.recovery_consistency_check(),
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=0,
        producer_max_batch_size=settings.joiner_producer_max_batch_bytes,
        stream_wait_empty=False,
        web_enabled=settings.joiner_web_port > 0,
        web_port=settings.joiner_web_port or 6066,
        web_host=settings.metrics_host,
    )
    table = app.Table(
        "funnels",
        key_type=bytes,
        value_type=bytes,
        partitions=settings.event_partitions,
    )

    def due_of(value: bytes, swept: Swept) -> Dues:
        return next_dues(decode_state(value), swept, cfg)

    join = FunnelJoin(
        cfg,
        topics,
        lambda partition: FaustTableStore(table, partition, due_of),
        clock,
        metrics,
        lateness_ms=settings.joiner_lateness_ms(),
        sweep_interval_s=settings.joiner_sweep_interval_ms / 1000.0,
        idle_timeout_s=settings.joiner_idle_timeout_ms / 1000.0,
        max_future_ms=settings.joiner_max_future_ms,
        fast_core=settings.joiner_fast_core,
    )
    source = app.topic(
        *topics.events, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    flusher = Flusher(app, table, join, clock, settings.joiner_sweep_interval_ms / 1000.0,
                      member_lost=lambda: member_lost(app.consumer))  # fmt: skip
    flusher_box.append(flusher)
    lean_fetch.install()  # aiokafka's fetched records a record batch at a time (docs/joiner.md, round 21)
    transport: Any = app.transport
    transport.Consumer = bulk_consumer(transport.Consumer, topics.events, flusher.handle_batch, flusher.flush,
                                       fetch_max_wait_ms=settings.joiner_fetch_max_wait_ms)  # fmt: skip

    @app.agent(source)
    async def funnel_join(stream: Any) -> None:
        """Subscribes ``source``, so that faust assigns its partitions, tracks their acks and
        commits them. Its records go from faust's fetcher to ``Flusher.handle``
        (``stream.kafka.faust_bulk``) and never come here; should one come (a consumer without the
        bulk loop), it is joined all the same."""
        for name in ("aiokafka", "faust", "mode"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
        consumer = app.consumer
        manual = stream.noack()  # acknowledged in ``Flusher.complete``, once the outputs are acked
        async for _ in manual:
            event = manual.current_event
            if event is None:
                continue
            msg = event.message
            hw = offsets.highwater(consumer, msg.tp)
            if flusher.handle(msg, hw is not None and msg.offset + 1 < hw):
                await flusher.flush()

    @app.timer(flusher.interval_s)
    async def sweep_when_idle() -> None:
        """The agent flushes as records arrive; this covers quiet spells (a topic going idle, the
        last records of a burst), so their samples, changelog records and acks still go out."""
        if flusher.idle():
            await flusher.flush()

    @app.timer(1.0)
    async def refresh_gauges() -> None:
        metrics.open_funnels.set(join.open_funnels())
        metrics.watermark_lag.set(join.watermark_lag_ms() / 1000.0)
        metrics.store_size.set(_dir_bytes(datadir))

    recreated_guard = offsets.RecreatedGuard()

    @app.timer(2.0)
    async def rewind_recreated_topics() -> None:
        """Partitions recreated under us (a broker that lost its data) are read again from the start."""
        consumer = app.consumer
        tps = list(consumer.assignment())
        await offsets.rewind_async(consumer, tps, {tp: offsets.highwater(consumer, tp) for tp in tps},
                                   recreated_guard)

    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        await flusher.revoked(revoked)

    app.on_partitions_revoked.connect(on_revoked)  # type: ignore[arg-type]

    async def on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
        log.info("assigned %s (generation %s)", sorted((tp.topic, tp.partition) for tp in assigned
                                                       if tp.topic in topics.events[:1] or tp.topic == flusher.changelog),
                 app.consumer_generation_id)  # fmt: skip

    app.on_partitions_assigned.connect(on_assigned)  # type: ignore[arg-type]

    return app, join


def joiner_worker(base: type, freeze: bool) -> type:
    """faust's ``Worker`` class (``base``) that, once started (tables recovered, before the join
    gets its first records), freezes the objects made so far out of the garbage collector's full
    passes when ``freeze`` (``JOINER_GC_FREEZE``; ``stream.ops.heap``)."""

    class JoinerWorker(base):
        async def on_startup_finished(self) -> None:
            await super().on_startup_finished()
            if freeze:
                log.info("started: %d objects frozen out of the garbage collector's passes", freeze_long_lived())

    return JoinerWorker


def main(argv: list[str] | None = None) -> int:
    """Run the joiner worker until SIGTERM/SIGINT."""
    parser = command_parser("joiner")
    add_loglevel(parser, "warning")
    args = parser.parse_args(argv)
    import faust

    settings = load_settings()
    collect_young_less_often(settings.joiner_gc_young_threshold)
    switch_gil_sooner(settings.joiner_switch_interval_us)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s joiner %(levelname)s %(message)s")
    from stream.kafka.broker import ensure_topics

    ensure_topics(settings.kafka_python_config(), settings.topic_specs(), settings.topic_replication_factor,
                  settings.kafka_connect_timeout_s)
    registry = process_registry()
    start_http_server(settings.metrics_port_joiner, addr=settings.metrics_host, registry=registry)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    app, _ = build_app(settings, registry)
    worker = joiner_worker(faust.Worker, settings.joiner_gc_freeze)(app, loglevel=args.loglevel, quiet=True)
    worker.execute_from_commandline()
    return 0
