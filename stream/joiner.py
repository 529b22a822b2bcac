"""``aitm-stream joiner``: the faust app that joins the five event topics into training samples.

faust's consumer reads the co-partitioned event topics and hands each record straight to the
join (``stream.faust_bulk``, past faust's per-event agent path; the agent only subscribes the
topics). Per-impression funnel state lives in a faust Table (``store="rocksdb://"``,
rocksdict) whose changelog restores it after a restart. The records drive
``stream.join.FunnelJoin``: one table write per event at most, state values in a compact
marshal codec, samples and dead letters only when due. Outputs and changelog records are
produced as record batches (``stream.sender.BatchSender``) once per
``JOINER_SWEEP_INTERVAL_MS``, when every partition whose topic watermarks (lanes) moved is
swept; a timer does the same in quiet spells. Each flush also tells the join which topic
partitions are read to their end (so a silent one can be idle). The expiry index is in memory
per lane and partition (rebuilt from the local RocksDB on the first record of a partition).
See docs/joiner.md.
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

from aiokafka.errors import IllegalStateError
from faust.types import TP
from prometheus_client import CollectorRegistry, start_http_server

from stream.clock import Clock, SystemClock
from stream.faust_bulk import bulk_consumer
from stream.funnel import Dues, FunnelConfig, Swept, decode_state, next_dues
from stream.join import SWEPT_KEY, FunnelJoin, JoinTopics, Output, pack_swept, unpack_swept
from stream.metrics import JoinerMetrics
from stream.sender import BatchSender
from stream.settings import Settings, load_settings
from stream.store import DueIndex

log = logging.getLogger(__name__)
META_PREFIX = b"\x00"  # table keys of metadata; impression ids are printable
# a tombstone that ends each flush's changelog records of a partition in a batch of its own
# (``BatchSender.seal``): Tansu's ListOffsets reports the start of the last batch + 1, and a new
# owner's recovery stopped there, missing the rest of the batch - states whose source records
# were acknowledged, so their funnels were lost on a rebalance (the two-joiner test)
SEAL_KEY = META_PREFIX + b"seal"
MAX_PENDING = 20_000  # source records between two flushes, at most
_MISSING: Any = object()


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
    return JoinTopics((ev[0], ev[1], ev[2], ev[3], ev[4]), settings.topic_samples, settings.topic_dead_letters)


class FaustTableStore:
    """``LabelStore`` over one partition of a faust Table's RocksDB, changelogged in our outbox.

    Faust's own ``table[key] = value`` costs about 0.3 ms per write (a FutureMessage through its
    producer buffer, two callbacks and a RocksDB offset write per record), which capped the
    join near 1.8k events/s. So a write - value None for a delete - goes into ``outbox``; at
    each flush ``drain()`` hands the outbox over (it stays readable as ``sending``), the agent
    sends it to the table's changelog topic and partition with the raw producer, and once it is
    acknowledged ``settle()`` writes it into the partition's rocksdict in one ``WriteBatch`` and
    the acked changelog offset is recorded as the store's persisted offset. Faust's recovery
    reads that changelog exactly as if it had written it. The source records behind those
    writes, and their outputs, are acknowledged in the same step (see ``build_app``): after a
    kill -9 the local RocksDB holds no write whose outputs may be lost, so the replayed records
    redo them. Reads look in ``outbox``, then ``sending``, then RocksDB. The due index (a heap
    per lane) is in memory, rebuilt on creation.
    """

    def __init__(self, table: Any, partition: int, due_of: Callable[[bytes, Swept], Dues]) -> None:
        self._table = table
        self.partition = partition
        self._db = table.data._db_for_partition(partition)
        self._index = DueIndex()
        # the keys of the states held: ``len`` counts them (the due index holds a key only while
        # it has a due time: not between ``pop_due`` and the sweep's ``reschedule``)
        self._keys: set[bytes] = set()
        # changelog records not yet sent: the latest value per key (None: delete). A compacted
        # changelog only needs the last write of a key, so writes between two sends coalesce.
        self.outbox: dict[bytes, bytes | None] = {}
        self.sending: dict[bytes, bytes | None] = {}  # drained, not yet acknowledged and settled
        swept = unpack_swept(self.get_meta(SWEPT_KEY))
        for key, value in self._db.items():
            if key.startswith(META_PREFIX) or key.startswith(b"__faust"):
                continue
            self._keys.add(bytes(key))
            self._index.set(bytes(key), due_of(bytes(value), swept))

    def get(self, key: bytes) -> bytes | None:
        v = self.outbox.get(key, _MISSING)
        if v is not _MISSING:
            return v
        if self.sending:
            v = self.sending.get(key, _MISSING)
            if v is not _MISSING:
                return v
        v = self._db.get(key)
        return v if v is None or type(v) is bytes else bytes(v)

    def put(self, key: bytes, value: bytes, dues: Dues | None) -> None:
        self.outbox[key] = value
        self._keys.add(key)
        self._index.set(key, dues)

    def reschedule(self, key: bytes, dues: Dues | None) -> None:
        if key in self._keys:  # a key not held is never due
            self._index.set(key, dues)

    def delete(self, key: bytes) -> None:
        self.outbox[key] = None
        self._keys.discard(key)
        self._index.set(key, None)

    def drain(self) -> dict[bytes, bytes | None]:
        """The writes since the last drain, to be sent; ``settle()`` them once acknowledged.
        One drain is outstanding at a time."""
        out = self.outbox
        if out:
            self.outbox = {}
            self.sending = out
        return out

    def settle(self, written: dict[bytes, bytes | None]) -> None:
        """Write drained writes into the local RocksDB, in one batch (a ``WriteBatch`` costs
        ~3 us per record against ~5.5 us for single puts)."""
        if not written:
            return
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        for key, value in written.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        self._db.write(batch)
        if self.sending is written:
            self.sending = {}

    def pop_due(self, lane: int, until_ms: int) -> list[bytes]:
        return self._index.pop_due(lane, until_ms)

    def get_meta(self, name: bytes) -> bytes | None:
        return self.get(META_PREFIX + name)

    def put_meta(self, name: bytes, value: bytes) -> None:
        self.outbox[META_PREFIX + name] = value  # not a state: neither counted nor indexed

    def put_meta_now(self, name: bytes, value: bytes) -> None:
        """``put_meta``, and straight into the local RocksDB too: for a value whose outputs are
        already acknowledged (the swept watermarks), so a kill -9 restarts from it rather than
        from the one of the flush before (fewer finals emitted twice)."""
        self.put_meta(name, value)
        self._db[META_PREFIX + name] = value

    def __len__(self) -> int:
        """States held (open and retained funnels), whether due or not."""
        return len(self._keys)


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


def _highwater(consumer: Any, tp: Any) -> int | None:
    """A partition's high watermark from the last fetch response; None when unknown or when the
    partition is no longer assigned (a rebalance between listing it and asking: aiokafka then
    raises, which would crash the app from a timer)."""
    try:
        hw: int | None = consumer.highwater(tp)
    except (AssertionError, IllegalStateError):
        return None
    return hw


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
    )
    source = app.topic(
        *topics.events, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )

    changelog = table.changelog_topic.get_topic_name()
    interval_s = settings.joiner_sweep_interval_ms / 1000.0

    senders: list[BatchSender] = []  # the one sender, made once the producer has started
    unacked: list[Any] = []  # source records joined since the last flush, not yet acknowledged
    next_offset: dict[Any, int] = {}  # per event topic partition: the offset after the last handled
    inflight: list[asyncio.Future[None]] = []  # the flush waiting for its acks (one at most)
    last_flush = [0.0]  # monotonic time of the last flush

    def get_sender() -> BatchSender:
        if not senders:
            producer: Any = app.producer  # faust's; its aiokafka producer makes the record batches
            senders.append(BatchSender(producer._ensure_producer(), lambda t, k: producer.key_partition(t, k).partition))
        return senders[0]

    async def flush(sender: BatchSender) -> None:
        """Sweep every partition whose watermark moved, drain every store's writes into the
        changelog, take everything queued, and submit it; the acks are awaited by a task, while
        the agent goes on. One flush is in flight at a time (a new one waits for the previous),
        so batches of a partition stay in order.

        Up to the snapshot this is synchronous, so no record is processed halfway through it.
        Records after it are judged against the new sweep at once (``take_sweep``), exactly as
        if the flush had completed; what waits for the acks is what a crash must not get ahead
        of: the stored swept watermarks, the persisted changelog offsets, and the
        acknowledgement of the source records (their offsets are committed only then)."""
        while inflight and not inflight[0].done():
            await asyncio.wait(inflight)
        if inflight:
            inflight.pop().result()  # a failed flush stops the agent
        report_positions()
        swept: list[tuple[int, Swept]] = []
        for p in list(join.parts):
            if join.sweep_due(p, force=True):
                out: list[Output] = []
                join.sweep(p, out)
                for o in out:
                    sender.add(o.topic, o.key, o.value)
                wm = join.take_sweep(p)
                if wm is not None:
                    swept.append((p, wm))
        written: list[tuple[FaustTableStore, dict[bytes, bytes | None]]] = []
        for p, part in list(join.parts.items()):
            store = part.store
            assert isinstance(store, FaustTableStore)
            drained = store.drain()
            if drained:
                written.append((store, drained))
                for key, value in drained.items():
                    sender.add(changelog, key, value, p)
                sender.seal(changelog, p, SEAL_KEY)  # the partition's true end for recovery
        batches = sender.take()
        messages = unacked[:]
        unacked.clear()
        last_flush[0] = clock.monotonic()
        if batches or messages or swept:
            inflight.append(asyncio.ensure_future(complete(sender, batches, written, swept, messages)))

    async def complete(
        sender: BatchSender,
        batches: list[Any],
        written: list[tuple[FaustTableStore, dict[bytes, bytes | None]]],
        swept: list[tuple[int, Swept]],
        messages: list[Any],
    ) -> None:
        """Submit a flush's batches and wait for their acks; then write the states into the local
        RocksDB, record the acked changelog offsets as the partitions' persisted offsets (for
        faust's recovery), store the swept watermarks (locally at once, so a restart after a
        kill -9 re-emits at most the last flush's finals; their changelog record goes out with
        the next flush) and acknowledge the source records."""
        acked: dict[int, int] = {}
        for sent in await sender.submit(batches):
            last = await sent.last_offset()
            if sent.topic == changelog and last > acked.get(sent.partition, -1):
                acked[sent.partition] = last
        for store, drained in written:
            store.settle(drained)
        backend: Any = table.data
        for p, offset in acked.items():
            backend.set_persisted_offset(TP(changelog, p), offset)
        for p, wm in swept:
            part = join.parts.get(p)
            if part is not None:  # not revoked meanwhile
                tstore = part.store
                assert isinstance(tstore, FaustTableStore)
                tstore.put_meta_now(SWEPT_KEY, pack_swept(wm))
        if messages:
            consumer = app.consumer
            assigned = consumer.assignment()
            ack = consumer.ack
            for message in messages:
                if message.tp in assigned:  # a revoked one is read again by its new owner
                    ack(message)

    def handle(message: Any, behind: bool) -> bool:
        """Join one source record (``stream.faust_bulk`` calls this from faust's fetch loop);
        True when a flush is due. The record is acknowledged in ``complete``."""
        sender = get_sender()
        out: list[Output] = []
        on_record(message.topic, message.partition, message.key, message.value, behind, out, message.offset)
        add = sender.add
        for o in out:
            add(o.topic, o.key, o.value)
        unacked.append(message)
        next_offset[message.tp] = message.offset + 1
        # once per interval, all partitions together: one flush, its acks awaited aside
        return len(unacked) >= MAX_PENDING or monotonic() - last_flush[0] >= interval_s

    async def flush_from_fetcher() -> None:
        await flush(senders[0])

    def report_positions() -> None:
        """Tell the join, per event topic partition it holds, whether the consumer has read it to
        its end (the high watermark of the last fetch response): only then can a silent topic
        be idle. A topic with records fetched but not yet handled is behind."""
        consumer: Any = app.consumer
        read_offset = consumer._read_offset  # faust's: after a seek, the committed position
        step_of = join.step_of
        for tp in consumer.assignment():
            step = step_of.get(tp.topic)
            if step is None or tp.partition not in join.parts:
                continue
            hw = _highwater(consumer, tp)
            if hw is None:
                continue
            pos = next_offset.get(tp)
            if pos is None:
                pos = read_offset.get(tp) or 0
            join.caught_up(tp.partition, step, pos >= hw)

    on_record = join.on_record
    monotonic = clock.monotonic
    transport: Any = app.transport
    transport.Consumer = bulk_consumer(transport.Consumer, topics.events, handle, flush_from_fetcher)

    @app.agent(source)
    async def funnel_join(stream: Any) -> None:
        """Subscribes ``source``, so that faust assigns its partitions, tracks their acks and
        commits them. Its records go from faust's fetcher to ``handle`` (``stream.faust_bulk``)
        and never come here; should one come (a consumer without the bulk loop), it is joined
        all the same."""
        for name in ("aiokafka", "faust", "mode"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
        consumer = app.consumer
        manual = stream.noack()  # acknowledged in ``complete``, once the outputs are acked
        async for _ in manual:
            event = manual.current_event
            if event is None:
                continue
            msg = event.message
            hw = _highwater(consumer, msg.tp)
            if handle(msg, hw is not None and msg.offset + 1 < hw):
                await flush(senders[0])

    @app.timer(interval_s)
    async def sweep_when_idle() -> None:
        """The agent flushes as records arrive; this covers quiet spells (a topic going idle, the
        last records of a burst), so their samples, changelog records and acks still go out."""
        if senders and clock.monotonic() - last_flush[0] >= interval_s:
            await flush(senders[0])

    @app.timer(1.0)
    async def refresh_gauges() -> None:
        metrics.open_funnels.set(join.open_funnels())
        metrics.watermark_lag.set(join.watermark_lag_ms() / 1000.0)
        metrics.store_size.set(_dir_bytes(datadir))

    @app.timer(2.0)
    async def rewind_recreated_topics() -> None:
        """A partition whose position is past its high watermark was recreated (a broker that lost
        its data, like the embedded one after a restart): read it again from the start."""
        consumer = app.consumer
        for tp in consumer.assignment():
            hw = _highwater(consumer, tp)
            if hw is None:
                continue
            try:
                pos = await consumer.position(tp)
            except IllegalStateError:  # revoked by a rebalance since assignment() was read
                continue
            if pos is not None and pos > hw:
                log.warning("%s[%d]: position %d past the high watermark %d - topic recreated; reading from the start",
                            tp.topic, tp.partition, pos, hw)  # fmt: skip
                await consumer.seek(tp, 0)

    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        """Before partitions move: flush what is pending (sweeps, states, outputs) and wait for the
        acks, so every state is in the local RocksDB and its changelog before the partitions'
        join state is forgotten. A flush still in flight when a partition came back (eager
        rebalances revoke everything) would otherwise settle its states into RocksDB after the
        partition's new store had read it: those funnels lost their due entries and never got a
        final (seen in the two-joiner test)."""
        if senders:
            await flush(senders[0])
            while inflight:
                await inflight.pop()
        for tp in revoked:
            next_offset.pop(tp, None)
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
