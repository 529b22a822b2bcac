"""Records of chosen topics handed from faust's fetcher straight to a handler.

faust delivers every record through a long per-record path: ``Consumer._drain_messages`` wraps
each one in ``Service.wait_first`` (four tasks and an ``asyncio.wait``), the conductor takes a
lock and awaits flow control and the producer buffer, builds an ``Event`` and queues it, and the
agent's ``Stream`` iterator takes it off the queue and calls the sensors. On the joiner's bench
that is about 90 us per record, the whole of a do-nothing agent's cost and more than the join.

``bulk_consumer()`` subclasses faust's consumer with a fetch loop that hands the records of the
chosen topics to ``handle(batch, spans)`` a batch at a time, synchronously and in fetch order, and
awaits ``flush()`` when it returns True. ``batch`` is the records as the join reads them,
``(topic, partition, key, value, offset, behind its high watermark)``; ``spans`` says which offsets
they are, ``(tp, first, last)`` per run of a partition's consecutive offsets, what the handler's
owner acknowledges later. A batch is the records read between two awaits of the loop (at most
``YIELD_EVERY``): it is handed over before the loop awaits anything (a gap, a commit, another
topic's record, flow control, a yield) and at the end of the fetch, so every flag the loop checks
(flow, generation, rebalancing) reads as it did for the one-record loop.

A fetch that holds only records of the chosen topics, each partition's offsets consecutive and
following those read (the usual fetch), is handed over without a Python step per record
(``_whole_fetch``, ``fetch_batches`` in ``stream/kafka/_records.c``): the checks the one-record loop
makes per record are made per partition, or after each await - the only points where what they
read can change but for the consumer thread's generation, which the one-record loop read per
record and this loop reads per batch (a rebalance that begins meanwhile stops it at the next
batch; the records after are read again after the rebalance's seek, as they were). Any other
fetch takes the one-record loop.

Everything else stays faust's:

- the consumer group, rebalances, the pausing of partitions while tables recover, and flow
  control: a batch stops at a rebalance (consumer flow stopped, or a new generation) exactly
  where faust's own loop stops; records not handled are read again after the rebalance's seek;
- read offsets and gap tracking (compacted or transactional topics), ``commit_every``;
- acknowledgements and commits: the handler's owner acknowledges what it handled, once it is done
  with it, with ``ack_spans`` - faust's ``Consumer.ack`` bookkeeping for every offset of the
  spans, under its ack lock once - and faust commits up to the acked offsets;
- records of other topics (table changelogs during recovery) take faust's usual path.

What it gives up for those topics: the agent's stream never sees their records (the agent is
only there so that faust subscribes the topics and tracks their acks), faust's sensors do not
count them (``Monitor.stream_inbound_time`` is still kept per partition, for faust's
slow-processing checks), no faust ``Message`` is made for them (faust's ``ConsumerMessage`` has
twenty attributes, ~1 us a record, that nothing here reads), and the handler must not block. It
relies on faust internals (``_wait_next_records``, ``_read_offset``, ``_add_gap``, ``ack``'s
bookkeeping): faust-streaming is pinned, ``bulk_consumer`` refuses any other version, and
``tests/unit/test_faust_bulk.py`` fails when faust's own loop (the one copied here) is not the one
this was written against.

Batches (issue 16): handing over a batch saves the join its per-record work (one decode call, one
multi-get per partition, one write per impression). An earlier version of it failed the chaos
bench, which was traced to false "topic was recreated" rewinds (fixed since: ``RecreatedGuard``);
see docs/joiner.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from itertools import chain, pairwise, repeat
from time import monotonic
from typing import Any

import faust
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.utils import DefaultSchedulingStrategy
from faust.types import TP
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

try:
    from stream.kafka import _records
except ImportError:  # pragma: no cover - built by every install here (setup.py); the Python twin otherwise
    _records = None  # type: ignore[assignment]

# a record as the join reads it: (topic, partition, key, value, offset, behind its high watermark)
BatchRecord = tuple[str, int, bytes | None, bytes | None, int, bool]
# a run of a topic partition's consecutive offsets handed over: (tp, first, last)
Span = tuple[TP, int, int]
# (records in fetch order, their spans) -> flush now?
Handle = Callable[[list[BatchRecord], list[Span]], bool]
Flush = Callable[[], Awaitable[None]]
FAUST_VERSION = "0.15.3"  # the faust-streaming whose consumer loop this copies
log = logging.getLogger(__name__)
YIELD_EVERY = 100  # records read between two yields to the event loop, as faust's loop (and a batch's most)


def _round_robin(seqs: Sequence[Sequence[Any]]) -> list[Any]:
    """The items of ``seqs`` taken one from each in turn, a sequence that has run out skipped:
    built a span of rounds at a time (the rounds until the next sequence runs out), with
    ``zip`` over slices - no Python step per item."""
    live = [s for s in seqs if s]
    if len(live) == 1:
        return list(live[0])
    out: list[Any] = []
    depth = 0
    while live:
        end = min(len(s) for s in live)
        out.extend(chain.from_iterable(zip(*(s[depth:end] for s in live), strict=True)))  # equal lengths
        live = [s for s in live if len(s) > end]
        depth = end
    return out


def fetch_order(records: Mapping[TP, Sequence[Any]]) -> list[tuple[TP, Any]]:
    """``(tp, record)`` of a fetch in the order faust's ``DefaultSchedulingStrategy.iterate`` gives
    them - round robin over the topics (in the order they first appear), each topic's turn taking
    its partitions round robin - as one list built by ``itertools`` rather than faust's two nested
    generators (~0.4 us a record: the largest share of the bulk loop's own cost, issue 16 round 19).
    ``tests/unit/test_faust_bulk.py`` checks it against faust's on random fetches."""
    by_topic: dict[str, list[list[tuple[TP, Any]]]] = {}
    for tp, recs in records.items():  # a topic's turn is where it first appears, records or not
        by_topic.setdefault(tp.topic, []).append(list(zip(repeat(tp), recs)))
    return _round_robin([_round_robin(parts) for parts in by_topic.values()])


def spans_of(tps: Sequence[TP], batch: Sequence[BatchRecord]) -> list[Span]:
    """The spans of ``batch`` (``tps[i]`` is ``batch[i]``'s): per topic partition, each run of
    consecutive offsets as ``(tp, first, last)``, in the order of their first records."""
    runs: dict[TP, list[Any]] = {}
    out: list[list[Any]] = []
    for tp, record in zip(tps, batch, strict=True):
        offset = record[4]
        run = runs.get(tp)
        if run is not None and run[2] == offset - 1:
            run[2] = offset
        else:
            run = runs[tp] = [tp, offset, offset]
            out.append(run)
    return [(tp, first, last) for tp, first, last in out]


def bulk_chunk_py(
    pairs: list[tuple[TP, Any]], start: int, end: int, highwaters: Mapping[TP, int | None]
) -> tuple[list[BatchRecord], list[Span]]:
    """``pairs[start:end]`` - ``(tp, record)`` in fetch order, each partition's records consecutive
    offsets - as the join's records and their spans (a batch of ``_records.fetch_batches``)."""
    chunk = pairs[start:end]
    batch: list[BatchRecord] = []
    for tp, r in chunk:
        hw = highwaters[tp]
        batch.append((tp.topic, tp.partition, r.key, r.value, r.offset, hw is not None and r.offset + 1 < hw))
    return batch, spans_of([tp for tp, _ in chunk], batch)


def fetch_batches_py(
    records: Mapping[TP, Sequence[Any]], highwaters: Mapping[TP, int | None], first: int, size: int
) -> list[tuple[list[BatchRecord], list[Span]]]:
    """A fetch's records in ``fetch_order``, cut into batches of ``first`` records, then ``size``
    each, as ``bulk_chunk_py`` makes them (``_records.fetch_batches``, in Python)."""
    pairs = fetch_order(records)
    bounds = [0, *range(min(first, len(pairs)), len(pairs), size), len(pairs)]
    return [bulk_chunk_py(pairs, a, b, highwaters) for a, b in pairwise(bounds) if b > a]


FetchBatches = Callable[[Mapping[TP, Sequence[Any]], Mapping[TP, int | None], int, int],
                        list[tuple[list[BatchRecord], list[Span]]]]  # fmt: skip
fetch_batches: FetchBatches = _records.fetch_batches if _records is not None else fetch_batches_py


def bulk_consumer(
    base: Any, topics: Collection[str], handle: Handle, flush: Flush, fetch_max_wait_ms: int | None = None
) -> type:
    """A subclass of faust's consumer class ``base`` whose fetch loop hands the records of
    ``topics`` to ``handle`` (see the module doc), and whose aiokafka consumer waits at most
    ``fetch_max_wait_ms`` at the broker per fetch (None: faust's 1500; see ``_new_consumer_thread``).
    Install it before the app's consumer is made:
    ``app.transport.Consumer = bulk_consumer(app.transport.Consumer, ...)``."""
    if faust.__version__ != FAUST_VERSION:
        raise TypeError(
            f"the joiner's bulk fetch loop copies faust-streaming {FAUST_VERSION}'s consumer loop, and "
            f"{faust.__version__} is installed: re-check stream/kafka/faust_bulk.py against it (and its test)"
        )
    bulk = frozenset(topics)
    needed = ("_wait_next_records", "_to_message", "_add_gap", "highwater", "perform_seek", "ack", "commit")
    for name in needed + (("_new_consumer_thread",) if fetch_max_wait_ms is not None else ()):
        if not hasattr(base, name):  # pragma: no cover - a faust upgrade changed its internals
            raise TypeError(f"{base.__qualname__} has no {name}: faust-streaming changed; see stream/kafka/faust_bulk.py")

    class BulkConsumer(base):  # faust's consumer class, given at run time
        def _new_consumer_thread(self) -> Any:
            """faust's consumer thread, whose aiokafka consumer waits ``fetch_max_wait_ms`` at most
            for a fetch's records. faust hard-codes 1500 ms (``_create_worker_consumer``); aiokafka
            keeps one fetch in flight per broker and, while a partition's fetched records wait to
            be read (over 0.1 s, its ``prefetch_backoff``), fetches only the other partitions: when
            those are caught up the fetch long-polls, and the backlog's next records wait for it
            (0.5-0.8 s stalls on the joiner's bench; docs/joiner.md, round 15). A shorter wait
            costs an empty fetch per interval when idle."""
            thread = super()._new_consumer_thread()
            if fetch_max_wait_ms is None:
                return thread
            create = thread._create_worker_consumer

            def create_worker_consumer(transport: Any) -> Any:
                client = create(transport)
                if not isinstance(getattr(client, "_fetch_max_wait_ms", None), int):  # pragma: no cover
                    raise TypeError(f"{type(client).__qualname__} has no _fetch_max_wait_ms: aiokafka changed; "
                                    "see stream/kafka/faust_bulk.py")  # fmt: skip
                client._fetch_max_wait_ms = fetch_max_wait_ms  # read by its start(), for its Fetcher
                return client

            thread._create_worker_consumer = create_worker_consumer
            return thread

        def ack_spans(self, spans: Iterable[Span]) -> int:
            """faust's ``Consumer.ack`` bookkeeping for every offset of ``spans`` (``(tp, first,
            last)``, each a run of a partition's consecutive offsets handled): each offset recorded
            for the commit unless below the committed one or acked already, under faust's ack lock
            once and waking a waiter once, not per record. Returns how many offsets were newly
            acked. ``tests/unit/test_faust_bulk.py`` checks it leaves faust's state as ``ack`` one
            record at a time does."""
            consumer: Any = self
            enabled = consumer.app.topics.acks_enabled_for
            enabled_for: dict[str, bool] = {}
            committed_of, index_of, acked_of = consumer._committed_offset, consumer._acked_index, consumer._acked
            n = 0
            with ack_lock:
                touched = False
                for tp, first, last in spans:
                    topic = tp.topic
                    on = enabled_for.get(topic)
                    if on is None:
                        on = enabled_for[topic] = bool(enabled(topic))
                    if not on:
                        continue
                    touched = True
                    committed = committed_of[tp]
                    lo = first if committed is None or first >= committed else committed
                    if lo > last:
                        continue
                    new: Sequence[int] = range(lo, last + 1)
                    index = index_of[tp]
                    if not index.isdisjoint(new):
                        new = [offset for offset in new if offset not in index]
                    index.update(new)
                    acked_of[tp].extend(new)
                    n += len(new)
                consumer._n_acked += n
                if touched:
                    notify(consumer._waiting_for_ack)
            return n

        def _whole_fetch(
            self, records: Mapping[TP, Sequence[Any]], active: Collection[TP] | None
        ) -> tuple[dict[TP, Sequence[Any]], dict[TP, int | None]] | None:
            """A fetch the one-record loop would hand over whole: its records per partition (the
            inactive ones skipped, as that loop does) and each partition's high watermark (read
            here, once, as that loop reads it, its monitor told), when it holds records of the bulk
            topics only, each partition's a run of consecutive offsets that follows the ones read
            (no gap, none read already). None for any other fetch: that loop takes it."""
            consumer: Any = self
            read_offset = consumer._read_offset
            acks_enabled_for = self.app.topics.acks_enabled_for
            buffered = consumer._buffered_partitions
            kept: dict[TP, Sequence[Any]] = {}
            for tp, recs in records.items():
                if tp.topic not in bulk:
                    return None
                if not recs or (active is not None and tp not in active and tp not in buffered):
                    continue
                first = recs[0].offset
                if recs[-1].offset - first != len(recs) - 1:
                    return None  # a compacted or transactional run: offsets skipped within it
                r_offset = read_offset[tp]
                if r_offset is not None and (first < r_offset or (r_offset and first - r_offset > 1 and
                                                                  acks_enabled_for(tp.topic))):  # fmt: skip
                    return None
                kept[tp] = recs
            monitor = self.app.monitor
            highwaters: dict[TP, int | None] = {}
            for tp in kept:
                hw = highwaters[tp] = self.highwater(tp)
                if monitor is not None:
                    monitor.track_tp_end_offset(tp, hw)
                    monitor.stream_inbound_time[tp] = monotonic()
            return kept, highwaters

        async def _hand_whole(
            self, records: dict[TP, Sequence[Any]], highwaters: dict[TP, int | None], generation: int,
            since_yield: int,
        ) -> tuple[int, bool]:  # pragma: no cover - the loop's; tests/unit/test_faust_bulk.py drives it
            """Hand ``_whole_fetch``'s records over in batches in ``fetch_order``, as the one-record
            loop would: a batch ends at ``YIELD_EVERY`` records since the last yield (``fetch_batches``
            cuts them) and before each await; after each await the flags are read again - a
            rebalance begun stops it (the rest read again after its seek), a commit due is made,
            flow control awaited. Returns (records since the last yield, held back: a rebalance
            came while records were left)."""
            consumer: Any = self
            app = self.app
            flow_control = app.flow_control
            read_offset = consumer._read_offset
            commit_every = self._commit_every
            for batch, spans in fetch_batches(records, highwaters, YIELD_EVERY - since_yield, YIELD_EVERY):
                if not self.flow_active or app.consumer_generation_id != generation:
                    break  # a rebalance began: its seek reads the rest again
                if app.rebalancing:
                    return since_yield, True  # see the one-record loop: read again once it is over
                if commit_every is not None and consumer._n_acked >= commit_every:
                    consumer._n_acked = 0
                    await self.commit()
                if not flow_control.is_active():
                    await self.wait_first(flow_control.acquire(), self.suspend_flow.wait())
                    if not self.flow_active or app.consumer_generation_id != generation:
                        break
                for tp, _, last in spans:
                    read_offset[tp] = last
                since_yield += len(batch)
                if handle(batch, spans):
                    await flush()
                if since_yield >= YIELD_EVERY:
                    since_yield = 0
                    await asyncio.sleep(0)
            return since_yield, False

        async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - needs a broker
            consumer: Any = self
            app = self.app
            callback = self.callback
            consumer_should_stop = self._stopped.is_set
            fetcher_should_stop = fetcher._stopped.is_set
            read_offset = self._read_offset
            acks_enabled_for = app.topics.acks_enabled_for
            to_message = self._to_message
            highwater = self.highwater
            monitor = app.monitor
            flow_control = app.flow_control
            since_yield = 0
            held_back = False  # records of the chosen topics left unhandled during a rebalance
            try:
                while not (consumer_should_stop() or fetcher_should_stop()):
                    self.diag.set_flag(CONSUMER_FETCHING)
                    records, active = await self._wait_next_records(1.0)
                    await asyncio.sleep(0)  # as faust: never hog the loop when fetches return at once
                    if held_back and not app.rebalancing:
                        # the rebalance is over: read the partitions again from their committed
                        # offsets (faust's own seek may have come before the records held back
                        # were fetched), and drop what was fetched before this seek
                        held_back = False
                        await self.perform_seek()
                        self.diag.unset_flag(CONSUMER_FETCHING)
                        continue
                    if not records or self.should_stop or not self.flow_active:
                        self.diag.unset_flag(CONSUMER_FETCHING)
                        continue
                    generation = app.consumer_generation_id
                    default_order = type(self.scheduler) is DefaultSchedulingStrategy
                    whole = self._whole_fetch(records, active) if default_order and not app.rebalancing else None
                    if whole is not None:  # the usual fetch: no Python step per record
                        since_yield, held = await self._hand_whole(whole[0], whole[1], generation, since_yield)
                        held_back = held_back or held
                        self.diag.unset_flag(CONSUMER_FETCHING)
                        continue
                    # per topic partition of the fetch, on its first record: (a bulk topic?, its
                    # high watermark as the fetch left it)
                    seen: dict[TP, tuple[bool, int | None]] = {}
                    # records of ``topics`` read but not yet handed over (and their partitions):
                    # handed over as one batch before every await (so no batch spans one, and every
                    # flag the loop checks is as the one-record loop saw it), every YIELD_EVERY
                    # records and at the fetch's end
                    pending: list[BatchRecord] = []
                    pending_tps: list[TP] = []
                    # what only an await can change (the event loop's own flags: flow control, acks
                    # counted towards a commit), read again after each one; the flags the consumer's
                    # thread may set (its generation) and the partitions' are read per record, as faust does
                    stale, flowing, commit = True, True, False
                    for tp, record in fetch_order(records) if default_order else self.scheduler.iterate(records):
                        if not self.flow_active or app.consumer_generation_id != generation:
                            break  # a rebalance began: its seek reads the rest again
                        if active is not None and tp not in active and tp not in self._buffered_partitions:
                            continue
                        info = seen.get(tp)
                        if info is None:
                            hw = highwater(tp)
                            info = seen[tp] = (tp.topic in bulk, hw)
                            if monitor is not None:
                                monitor.track_tp_end_offset(tp, hw)
                                monitor.stream_inbound_time[tp] = monotonic()
                        bulk_record = info[0]
                        if bulk_record and app.rebalancing:
                            # faust resumes the partitions (and its flow, which recovery uses for
                            # the changelogs) before its rebalance ends with a seek to the committed
                            # offsets: a record handled now can be one that seek rewinds past, and
                            # the next batch after it would look like a gap that faust counts as
                            # read - records never joined (bench rebalance, seed 56). Held back
                            # until the rebalance is over, then read again.
                            held_back = True
                            continue
                        # faust's own ``ConsumerMessage`` for the records of other topics, which take
                        # faust's usual path (none for the bulk topics' records)
                        message = None if bulk_record else to_message(tp, record)
                        offset = record.offset
                        r_offset = read_offset[tp]
                        if r_offset is not None and offset < r_offset:
                            continue  # read already (faust drops these too)
                        gap = bool(r_offset and offset - r_offset > 1 and acks_enabled_for(tp.topic))
                        if stale:
                            flowing = flow_control.is_active()
                            commit = self._commit_every is not None and consumer._n_acked >= self._commit_every
                            stale = False
                        if pending and (gap or commit or not bulk_record or not flowing):
                            # an await follows: hand over what came before
                            batch, tps, pending, pending_tps = pending, pending_tps, [], []
                            if handle(batch, spans_of(tps, batch)):
                                await flush()
                                stale = True
                            if not self.flow_active or app.consumer_generation_id != generation:
                                break  # a rebalance came during the flush: its seek set the read offsets
                        if gap:
                            if bulk_record:  # records faust will count as read: say so (evidence)
                                log.warning("%s[%d]: offset %d follows %d - faust counts the %d records between "
                                            "as read (a gap)", tp.topic, tp.partition, offset, r_offset,
                                            offset - r_offset - 1)  # fmt: skip
                            await self._add_gap(tp, r_offset + 1, offset)
                            stale = True
                        if commit:
                            consumer._n_acked = 0
                            await self.commit()
                            stale = True  # acks may have come meanwhile: counted again
                        if bulk_record:
                            if stale:
                                flowing = flow_control.is_active()
                                commit = self._commit_every is not None and consumer._n_acked >= self._commit_every
                                stale = False
                            if not flowing:
                                await self.wait_first(flow_control.acquire(), self.suspend_flow.wait())
                                stale = True
                                if not self.flow_active or app.consumer_generation_id != generation:
                                    break
                            hw = info[1]
                            pending.append((tp.topic, tp.partition, record.key, record.value, offset,
                                            hw is not None and offset + 1 < hw))  # fmt: skip
                            pending_tps.append(tp)
                        else:
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                            stale = True
                        read_offset[tp] = offset
                        since_yield += 1
                        if since_yield >= YIELD_EVERY:
                            since_yield = 0
                            if pending:
                                batch, tps, pending, pending_tps = pending, pending_tps, [], []
                                if handle(batch, spans_of(tps, batch)):
                                    await flush()
                            await asyncio.sleep(0)
                            stale = True
                    if pending and handle(pending, spans_of(pending_tps, pending)):  # the fetch's last records
                        await flush()
                    self.diag.unset_flag(CONSUMER_FETCHING)
            except self.consumer_stopped_errors:
                if self.transport.app.should_stop:
                    self.log.info("Broker stopped consumer, shutting down...")
                    return
                raise
            except asyncio.CancelledError:
                if self.transport.app.should_stop:
                    self.log.info("Consumer shutting down for user cancel.")
                    return
                raise
            except Exception as exc:
                self.log.exception("Drain messages raised: %r", exc)
                raise
            finally:
                self.diag.unset_flag(CONSUMER_FETCHING)

    return BulkConsumer


def member_lost(consumer: Any) -> bool:
    """Whether faust's consumer has lost its group membership: aiokafka resets the member id when
    the coordinator no longer knows it (a heartbeat answered UnknownMemberId or IllegalGeneration,
    e.g. after the process stalled past its session timeout) until it joins again. Its partitions
    may be another member's by then. False when the consumer has not started."""
    thread = getattr(consumer, "_thread", None)
    client = getattr(thread, "_consumer", None)
    coordinator = getattr(client, "_coordinator", None)
    if coordinator is None:
        return False
    return getattr(coordinator, "member_id", None) == ""  # aiokafka's JoinGroupRequest.UNKNOWN_MEMBER_ID
