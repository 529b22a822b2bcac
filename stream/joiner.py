"""``aitm-stream joiner``: the faust app that joins the five event topics into training samples.

One agent reads the co-partitioned event topics; per-impression funnel state lives in a faust
Table (``store="rocksdb://"``, rocksdict) whose changelog restores it after a restart. The
agent drives ``stream.join.FunnelJoin``: one table write per event at most, state values in a
compact marshal codec, samples and dead letters only when due. Outputs and changelog records
are produced as record batches (``stream.sender.BatchSender``) once per
``JOINER_SWEEP_INTERVAL_MS``, when every partition whose watermark moved is swept; a timer
does the same in quiet spells. The expiry index is in memory per partition (rebuilt from the
local RocksDB on the first record of a partition). See docs/joiner.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from faust.types import TP
from prometheus_client import CollectorRegistry, start_http_server

from stream.clock import Clock, SystemClock
from stream.funnel import NO_WATERMARK, FunnelConfig, decode_state, next_due
from stream.join import SWEPT_KEY, FunnelJoin, JoinTopics, Output
from stream.metrics import JoinerMetrics
from stream.sender import BatchSender
from stream.settings import Settings, load_settings
from stream.store import DueIndex

log = logging.getLogger(__name__)
META_PREFIX = b"\x00"  # table keys of metadata; impression ids are printable
MAX_PENDING = 20_000  # records queued between two flushes, at most


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
    )


def join_topics(settings: Settings) -> JoinTopics:
    ev = tuple(settings.event_topics().values())
    return JoinTopics((ev[0], ev[1], ev[2], ev[3], ev[4]), settings.topic_samples, settings.topic_dead_letters)


class FaustTableStore:
    """``LabelStore`` over one partition of a faust Table's RocksDB, changelogged in our outbox.

    Faust's own ``table[key] = value`` costs about 0.3 ms per write (a FutureMessage through its
    producer buffer, two callbacks and a RocksDB offset write per record), which capped the
    join near 1.8k events/s. So states are written straight into the partition's rocksdict and
    the same (key, value) - value None for a delete - is queued in ``outbox``; the agent sends
    it to the table's changelog topic and partition with the raw producer and records the acked
    changelog offset as the store's persisted offset. Faust's recovery reads that changelog
    exactly as if it had written it. The due index is in memory, rebuilt on creation.
    """

    def __init__(self, table: Any, partition: int, due_of: Callable[[bytes, int], int | None]) -> None:
        self._table = table
        self.partition = partition
        self._db = table.data._db_for_partition(partition)
        self._index = DueIndex()
        # changelog records not yet sent: the latest value per key (None: delete). A compacted
        # changelog only needs the last write of a key, so writes between two sends coalesce.
        self.outbox: dict[bytes, bytes | None] = {}
        raw = self.get_meta(SWEPT_KEY)
        swept = int.from_bytes(raw, "big", signed=True) if raw else NO_WATERMARK
        for key, value in self._db.items():
            if key.startswith(META_PREFIX) or key.startswith(b"__faust"):
                continue
            self._index.set(bytes(key), due_of(bytes(value), swept))

    def get(self, key: bytes) -> bytes | None:
        v = self._db.get(key)
        return v if v is None or type(v) is bytes else bytes(v)

    def put(self, key: bytes, value: bytes, due_ms: int | None) -> None:
        self._db.put(key, value)
        self.outbox[key] = value
        self._index.set(key, due_ms)

    def reschedule(self, key: bytes, due_ms: int | None) -> None:
        self._index.set(key, due_ms)

    def delete(self, key: bytes) -> None:
        self._db.delete(key)
        self.outbox[key] = None
        self._index.set(key, None)

    def pop_due(self, until_ms: int) -> list[bytes]:
        return self._index.pop_due(until_ms)

    def get_meta(self, name: bytes) -> bytes | None:
        return self.get(META_PREFIX + name)

    def put_meta(self, name: bytes, value: bytes) -> None:
        self.put(META_PREFIX + name, value, None)

    def __len__(self) -> int:
        return len(self._index)


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
    app = faust.App(
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

    def due_of(value: bytes, swept: int) -> int | None:
        return next_due(decode_state(value), swept, cfg)

    join = FunnelJoin(
        cfg,
        topics,
        lambda partition: FaustTableStore(table, partition, due_of),
        clock,
        metrics,
        lateness_ms=settings.joiner_allowed_lateness_ms,
        sweep_interval_s=settings.joiner_sweep_interval_ms / 1000.0,
        warmup_s=settings.joiner_warmup_ms / 1000.0,
    )
    source = app.topic(
        *topics.events, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )

    changelog = table.changelog_topic.get_topic_name()
    interval_s = settings.joiner_sweep_interval_ms / 1000.0

    senders: list[BatchSender] = []  # the one sender, made once the producer has started
    flush_lock = asyncio.Lock()
    last_flush = [0.0]  # monotonic time of the agent's last flush

    def get_sender() -> BatchSender:
        if not senders:
            producer: Any = app.producer  # faust's; its aiokafka producer makes the record batches
            senders.append(BatchSender(producer._ensure_producer(), lambda t, k: producer.key_partition(t, k).partition))
        return senders[0]

    async def sweep_and_flush(sender: BatchSender) -> None:
        """Sweep every partition whose watermark moved, send everything queued, wait for the acks,
        then move the swept watermarks (the samples are out by then). The agent holds off new
        records while this runs (see ``flush_lock``), so no record sees a half-committed sweep."""
        async with flush_lock:
            swept = [p for p in list(join.parts) if join.sweep_due(p, force=True)]
            for p in swept:
                out: list[Output] = []
                join.sweep(p, out)
                for o in out:
                    sender.add(o.topic, o.key, o.value)
            await _flush(sender)
            for p in swept:
                if p in join.parts:  # not revoked meanwhile
                    join.commit_sweep(p)  # its changelog record goes out with the next flush
            last_flush[0] = clock.monotonic()

    async def _flush(sender: BatchSender) -> None:
        """Send every queued output and changelog record and wait for the acks; then record the
        acked changelog offsets as the partitions' persisted offsets (for faust's recovery)."""

        for p in list(join.parts):
            store = join.parts[p].store
            assert isinstance(store, FaustTableStore)
            for key, value in store.outbox.items():
                sender.add(changelog, key, value, p)
            store.outbox.clear()
        if not sender.pending:
            return
        acked: dict[int, int] = {}
        for sent in await sender.flush():
            last = await sent.last_offset()
            if sent.topic == changelog and last > acked.get(sent.partition, -1):
                acked[sent.partition] = last
        backend: Any = table.data
        for p, offset in acked.items():
            backend.set_persisted_offset(TP(changelog, p), offset)

    @app.agent(source)
    async def funnel_join(stream: Any) -> None:
        for name in ("aiokafka", "faust", "mode"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
        sender = get_sender()
        highwater = app.consumer.highwater
        on_record = join.on_record
        add = sender.add
        async for event in stream.events():
            if flush_lock.locked():  # a timer's sweep is waiting for acks: let it finish first
                async with flush_lock:
                    pass
            msg = event.message
            out: list[Output] = []
            hw = highwater(msg.tp)
            on_record(msg.topic, msg.partition, msg.key, msg.value, hw is not None and msg.offset + 1 < hw, out, msg.offset)
            for o in out:
                add(o.topic, o.key, o.value)
            if sender.pending >= MAX_PENDING or clock.monotonic() - last_flush[0] >= interval_s:
                # once per interval, all partitions together: one flush and one wait for acks
                await sweep_and_flush(sender)

    @app.timer(interval_s)
    async def sweep_when_idle() -> None:
        """The agent sweeps as records arrive; this covers quiet spells (the warm-up ending, the
        last records of a burst), so their samples and changelog records still go out."""
        if senders and clock.monotonic() - last_flush[0] >= interval_s:
            await sweep_and_flush(senders[0])

    @app.timer(1.0)
    async def refresh_gauges() -> None:
        metrics.open_funnels.set(join.open_funnels())
        metrics.watermark_lag.set(join.watermark_lag_ms() / 1000.0)
        metrics.store_size.set(_dir_bytes(datadir))

    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        for tp in revoked:
            join.forget(tp.partition)

    app.on_partitions_revoked.connect(on_revoked)  # type: ignore[arg-type]

    return app, join


def main(argv: list[str] | None = None) -> int:
    """Run the joiner worker until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="aitm-stream joiner", description=__doc__)
    parser.add_argument("--loglevel", default="warning")
    args = parser.parse_args(argv)
    import faust

    settings = load_settings()
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s joiner %(levelname)s %(message)s")
    from stream.broker import ensure_topics

    ensure_topics(settings.kafka_python_config(), settings.topic_specs(), settings.topic_replication_factor)
    registry = CollectorRegistry()
    start_http_server(settings.metrics_port_joiner, addr=settings.metrics_host, registry=registry)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    app, _ = build_app(settings, registry)
    worker = faust.Worker(app, loglevel=args.loglevel, quiet=True)
    worker.execute_from_commandline()
    return 0
