"""The joiner's flush/ack protocol: what is joined goes out in batches, and a source record is
acknowledged only once everything it caused is acknowledged by the broker.

``handle_batch`` joins a batch of source records (``stream.kafka.faust_bulk`` calls it from faust's
fetch loop) and queues their outputs; ``flush`` - once per ``JOINER_SWEEP_INTERVAL_MS``, from the fetch loop
or a timer - sweeps every partition whose watermarks moved, drains every store's writes into
the table's changelog, and submits it all - the outputs first, the changelog records once the
outputs are acknowledged; ``complete`` waits for the acks, then writes the
states into the local RocksDB with the acked changelog offsets for faust's recovery (one batch per
partition: ``FaustTableStore.settle``), stores the swept watermarks
and acknowledges the source records (faust commits their offsets only then). A kill -9 therefore
costs nothing that was acknowledged; see docs/joiner.md.

Two flushes may be in flight (``MAX_INFLIGHT``), so that the fetch loop goes on joining while the
broker acknowledges the previous flush (it waited for it before, a third of the time of a backlog
read: docs/joiner.md, round 15). Their order is kept where it matters: a flush's outputs are
submitted after the previous flush's outputs (the producer keeps a partition's batches in order,
so a funnel's samples stay in order), its changelog records after its own outputs are
acknowledged and after the previous flush completed, and it settles its states, persists offsets
and swept lanes and acknowledges its records only after the previous flush did - and not at all
if the previous flush failed.

A partition's changelog and outputs are written only while the joiner owns it: the member that
takes a partition over recovers it from the changelog up to its end, and a member that takes it
back later recovers from its own persisted offset - a write landing after either point would be
lost, or would hide the other member's writes before it. So once the app is stopping nothing
more is flushed (``close`` waits for the flush in flight before the consumer commits and leaves
the group; what was joined since stays unacknowledged and is read again by the next owner), and
a member evicted from its group (a stalled process whose session expired) neither flushes nor
flushes on the revocation that follows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from stream.join.driver import BatchRecord, FunnelJoin, Output
from stream.join.faust_store import SEAL_KEY, FaustTableStore
from stream.join.funnel import Swept
from stream.kafka import offsets
from stream.kafka.faust_bulk import Span
from stream.kafka.partitioner import producer_partition_of
from stream.kafka.sender import BatchSender
from stream.ops.clock import Clock

MAX_PENDING = 20_000  # source records between two flushes, at most
MAX_INFLIGHT = 2  # flushes submitted and not yet completed, at most
CLOSE_WAIT_S = 30.0  # at a stop, how long the flush in flight may take to be acknowledged

log = logging.getLogger(__name__)


def _resolve(signal: asyncio.Future[None]) -> None:
    """Resolve ``signal`` unless it is already."""
    if not signal.done():
        signal.set_result(None)


class Flusher:
    """The protocol's state for one faust app: its sender, the records not yet acknowledged, the
    offsets handled per event topic partition and the flush in flight."""

    def __init__(
        self, app: Any, table: Any, join: FunnelJoin, clock: Clock, interval_s: float,
        member_lost: Callable[[], bool] = lambda: False,
    ) -> None:  # fmt: skip
        """``member_lost`` tells whether the consumer's group membership is gone (evicted), e.g.
        ``stream.kafka.faust_bulk.member_lost``."""
        self.app, self.table, self.join, self.clock = app, table, join, clock
        self.interval_s = interval_s
        self.member_lost = member_lost
        self.closed = False  # the app is stopping: nothing more goes out
        self.changelog: str = table.changelog_topic.get_topic_name()
        self.sender: BatchSender | None = None  # made once the producer has started
        # the source records joined since the last flush: how many, their spans of offsets (the
        # bulk loop's), and the messages that came through faust's agent instead
        self.pending = 0
        self.unacked: list[Span] = []
        self.unacked_messages: list[Any] = []
        self.next_offset: dict[Any, int] = {}  # per event topic partition: the offset after the last handled
        # the flushes waiting for their acks, oldest first (MAX_INFLIGHT at most), and the newest
        # one's "outputs submitted" signal, which the next flush's outputs wait for
        self.inflight: list[asyncio.Future[None]] = []
        self.outputs_queued: asyncio.Future[None] | None = None
        # the newest flush, which the next completes after: kept here, not read off ``inflight``,
        # which ``wait_inflight`` empties while a flush it took may still be in flight
        self.last_flight: asyncio.Future[None] | None = None
        self.last_flush = 0.0  # monotonic time of the last flush
        self.waited: set[Any] = set()  # partitions seen active before their recovery (logged once)

    def get_sender(self) -> BatchSender:
        if self.sender is None:
            producer: Any = self.app.producer  # faust's; its aiokafka producer makes the record batches
            client = producer._ensure_producer()
            self.sender = BatchSender(client, producer_partition_of(
                client, lambda t, k: producer.key_partition(t, k).partition))
        return self.sender

    def handle(self, message: Any, behind: bool) -> bool:
        """Join one source record that came through faust's agent (a consumer without the bulk loop:
        ``handle_batch`` of one); it is acknowledged with faust's ``Consumer.ack`` in ``complete``.
        True when a flush is due."""
        self.unacked_messages.append(message)
        self.next_offset[message.tp] = message.offset + 1
        record = (message.topic, message.partition, message.key, message.value, message.offset, behind)
        return self.handle_batch([record], [])

    def handle_batch(self, batch: Sequence[BatchRecord], spans: list[Span]) -> bool:
        """Join source records, ``(topic, partition, key, value, offset, behind its high watermark)``
        in fetch order, as one batch (``FunnelJoin.on_batch``); ``spans`` - ``(tp, first offset,
        last offset)`` - are acknowledged in ``complete`` (``BulkConsumer.ack_spans``). True when a
        flush is due."""
        sender = self.get_sender()
        out: list[Output] = []
        self.join.on_batch(batch, out)
        sender.add_all(out)
        self.unacked += spans
        next_offset = self.next_offset
        for tp, _, last in spans:
            next_offset[tp] = last + 1
        self.pending += len(batch)
        # once per interval, all partitions together: one flush, its acks awaited aside
        return self.pending >= MAX_PENDING or self.clock.monotonic() - self.last_flush >= self.interval_s

    def may_write(self, final: bool = False) -> bool:
        """Whether this member may write its partitions' changelog and outputs: not once the app
        stops (but for ``close``'s own ``final`` flushes), nor once its group membership is lost
        (see the module doc)."""
        if self.closed or (self.app.should_stop and not final):
            return False
        if self.member_lost():
            log.warning("not flushing: this joiner is no longer a member of its group (session expired); "
                        "its partitions are another member's now")  # fmt: skip
            return False
        return True

    async def close(self) -> None:
        """The app is stopping (before its fetcher, consumer and tables stop, so while it still owns
        its partitions): flush what is pending and wait for it - its changelog records land and
        its source records are acknowledged before the consumer commits and leaves the group -
        then nothing more goes out (``final_flushes``)."""
        await self.final_flushes(CLOSE_WAIT_S)
        self.closed = True
        await self.wait_inflight(CLOSE_WAIT_S)

    async def final_flushes(self, timeout_s: float | None = None) -> None:
        """The last flushes of an ownership (a revocation, a stop): everything pending, then the
        swept lanes that flush stored (they go out with the flush after the one whose outputs they
        cover), so the next owner starts from them - not from the flush before, which would re-emit
        that flush's finals and, with a quiet tail, leave the next owner's lanes a little behind."""
        if self.sender is None:
            return
        for _ in range(2):
            await self.flush(final=True)
            await self.wait_inflight(timeout_s)

    async def wait_inflight(self, timeout_s: float | None = None) -> None:
        """Wait for every flush in flight, oldest first; ``timeout_s`` bounds the whole wait."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while self.inflight:
            fut = self.inflight.pop(0)
            left = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await asyncio.wait_for(asyncio.shield(fut), left)
            except TimeoutError:  # a broker that does not answer: stop anyway, nothing acknowledged
                log.warning("a flush got no answer from the broker within %.0f s", timeout_s)
            except Exception:  # its records were not acknowledged: their next owner reads them again
                log.exception("a flush failed")

    def idle(self) -> bool:
        """Whether a flush is owed to a quiet spell (nothing flushed for an interval): records that
        came before it, or partitions assigned to a joiner that has had no record since (their
        lanes still move once their silent topics go idle)."""
        return self.clock.monotonic() - self.last_flush >= self.interval_s

    async def flush(self, final: bool = False) -> None:
        """Sweep every partition whose watermark moved, drain every store's writes into the
        changelog, take everything queued, and submit it; the acks are awaited by a task, while
        the agent goes on. At most ``MAX_INFLIGHT`` flushes are in flight (a new one waits for
        the oldest), completed in order (see the module doc).

        Up to the snapshot this is synchronous, so no record is processed halfway through it.
        Records after it are judged against the new sweep at once (``take_sweep``), exactly as
        if the flush had completed; what waits for the acks is what a crash must not get ahead
        of: the stored swept watermarks, the persisted changelog offsets, and the
        acknowledgement of the source records (their offsets are committed only then)."""
        sender = self.get_sender()
        join = self.join
        inflight = self.inflight
        while inflight and (len(inflight) >= MAX_INFLIGHT or inflight[0].done()):
            oldest = inflight[0]
            if not oldest.done():
                await asyncio.wait([oldest])
                continue  # look again: the fetch loop and the sweep timer both flush
            inflight.pop(0).result()  # a failed flush stops the agent
        if not self.may_write(final):
            self.last_flush = self.clock.monotonic()
            return
        self.report_positions()
        swept: list[tuple[int, Swept]] = []
        for p in list(join.parts):
            if join.sweep_due(p, force=True):
                out: list[Output] = []
                join.sweep(p, out)
                sender.add_all(out)
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
                sender.add_to(self.changelog, p, drained.items())
                sender.seal(self.changelog, p, SEAL_KEY)  # the partition's true end for recovery
        batches = sender.take()
        spans, messages = self.unacked, self.unacked_messages
        self.unacked, self.unacked_messages, self.pending = [], [], 0
        self.last_flush = self.clock.monotonic()
        if batches or spans or messages or swept:
            last = self.last_flight
            before = last if last is not None and not last.done() else None
            queued_before, queued = self.outputs_queued, asyncio.get_running_loop().create_future()
            self.outputs_queued = queued
            task = asyncio.ensure_future(
                self.complete(sender, batches, written, swept, spans, messages, before, queued_before, queued))
            task.add_done_callback(lambda _: _resolve(queued))
            self.inflight.append(task)
            self.last_flight = task

    async def complete(
        self,
        sender: BatchSender,
        batches: list[Any],
        written: list[tuple[FaustTableStore, dict[bytes, bytes | None]]],
        swept: list[tuple[int, Swept]],
        spans: list[Span],
        messages: list[Any],
        before: asyncio.Future[None] | None = None,
        queued_before: asyncio.Future[None] | None = None,
        queued: asyncio.Future[None] | None = None,
    ) -> None:
        """Submit a flush's batches and wait for their acks; then write the states into the local
        RocksDB, record the acked changelog offsets as the partitions' persisted offsets (for
        faust's recovery), store the swept watermarks (locally at once, so a restart after a
        kill -9 re-emits at most the last flush's finals; their changelog record goes out with
        the next flush) and acknowledge the source records (``spans`` of the bulk loop's, faust
        ``messages`` of the agent's).

        ``before``: the previous flush, still in flight; ``queued_before`` resolves once its
        outputs are submitted; ``queued`` is resolved here once this flush's outputs are (and by
        ``flush`` if this one fails first, so that it holds no later flush's outputs back)."""
        # the outputs (samples, dead letters) first, acknowledged, and only then the changelog
        # records of the states that caused them: a kill -9 in between leaves the states as they
        # were, and the next owner redoes those outputs. The other way round, a state change that
        # landed without its output (a held event dead-lettered by a sweep, a correction) left
        # nothing to redo: the output was lost for good.
        changelog = self.changelog
        outputs = [b for b in batches if b[0] != changelog]
        states = [b for b in batches if b[0] == changelog]
        if queued_before is not None:
            await queued_before  # the previous flush's outputs go first, partition by partition
        submitted = await sender.submit(outputs) if outputs else []
        if queued is not None:
            queued.set_result(None)
        for sent in submitted:
            await sent.last_offset()
        if before is not None:
            # its states are settled and its changelog records acknowledged before this flush's
            # go out (a partition's changelog in order); if it failed, this one fails too
            await asyncio.shield(before)
        acked: dict[int, int] = {}
        if states:
            for sent in await sender.submit(states):
                last = await sent.last_offset()
                if last > acked.get(sent.partition, -1):
                    acked[sent.partition] = last
        if self.member_lost():
            # evicted while this flush was out: another member may have recovered these partitions
            # and written after these records. Settling them and recording their offsets as the
            # persisted ones would make a later recovery here skip that member's writes; leaving
            # them unacknowledged has their next owner read the source records again.
            log.warning("a flush completed after this joiner lost its group membership: not settled")
            return
        # each partition's states with the acked changelog offset that covers them, in one batch
        # (faust's recovery starts after that offset: both land in RocksDB, or neither)
        for store, drained in written:
            store.settle(drained, acked.pop(store.partition, None))
        for p, offset in acked.items():  # changelog records with no states of this flush (none today)
            part = self.join.parts.get(p)
            if part is not None:
                held = part.store
                assert isinstance(held, FaustTableStore)
                held.settle({}, offset)
        for p, wm in swept:
            self.join.persist_swept(p, wm)  # unless revoked meanwhile
        if spans or messages:
            # a revoked partition's records are not acknowledged: its new owner reads them again
            consumer = self.app.consumer
            assigned = consumer.assignment()
            if spans:
                consumer.ack_spans([span for span in spans if span[0] in assigned])  # the bulk loop's consumer
            for message in messages:
                if message.tp in assigned:
                    consumer.ack(message)

    def report_positions(self) -> None:
        """Tell the join, per event topic partition it holds, whether the consumer has read it to
        its end (the high watermark of the last fetch response): only then can a silent topic
        be idle. A topic with records fetched but not yet handled is behind."""
        consumer: Any = self.app.consumer
        read_offset = consumer._read_offset  # faust's: after a seek, the committed position
        # faust's partitions being read: those of a table still recovering are paused (not active);
        # but faust marks a new assignment's partitions active before it pauses them for the
        # restore, so none is taken while its rebalance is not over (``app.rebalancing``: from the
        # revocation until the assignment is recovered and resumed)
        active = getattr(consumer, "_active_partitions", None)
        recovering = bool(getattr(self.app, "rebalancing", False))
        join = self.join
        step_of = join.step_of
        for tp in consumer.assignment():
            step = step_of.get(tp.topic)
            if step is None:
                continue
            if tp.partition not in join.parts:
                # an assigned partition is joined from the moment its state is recovered, not from
                # its next record: one that gets none (a quiet tail) still sweeps what is due
                if step != 0 or (active is not None and tp not in active):
                    continue
                if recovering:
                    if tp not in self.waited:
                        self.waited.add(tp)
                        log.info("partition %d: active while its rebalance is not over - joined once "
                                 "its state is recovered", tp.partition)  # fmt: skip
                    continue
                join.part(tp.partition)
            hw = offsets.highwater(consumer, tp)
            if hw is None:
                continue
            pos = self.next_offset.get(tp)
            if pos is None:
                pos = read_offset.get(tp) or 0
            join.caught_up(tp.partition, step, pos >= hw)

    async def revoked(self, tps: Any) -> None:
        """Before partitions move: flush what is pending (sweeps, states, outputs) and wait for the
        acks, so every state is in the local RocksDB and its changelog before the partitions'
        join state is forgotten. A flush still in flight when a partition came back (eager
        rebalances revoke everything) would otherwise settle its states into RocksDB after the
        partition's new store had read it: those funnels lost their due entries and never got a
        final (seen in the two-joiner test)."""
        log.info("revoked %s: %d records joined since the last flush, %d flush(es) in flight%s",
                 sorted((tp.topic, tp.partition) for tp in tps), self.pending, len(self.inflight),
                 " (membership lost: not flushed)" if self.member_lost() else "")  # fmt: skip
        await self.final_flushes()  # nothing when evicted: then the next owner reads it all again
        await self.wait_inflight()
        self.unacked = [span for span in self.unacked if span[0] not in tps]
        self.unacked_messages = [m for m in self.unacked_messages if m.tp not in tps]
        for tp in tps:
            self.waited.discard(tp)
            self.next_offset.pop(tp, None)
            self.join.forget(tp.partition)
