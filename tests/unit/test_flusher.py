"""The joiner's flush/ack protocol (``stream.join.flusher``) around the end of a partition's ownership.

The rules (docs/joiner.md, "Delivery, state and recovery"): a joiner writes a partition's changelog
and outputs only while it owns the partition, so that the member that takes the partition over
recovers every state from the changelog, and so that a member taking it *back* later, recovering
from its own persisted changelog offset, skips nothing another member wrote. Hence:

- once the app is stopping, no flush goes out (records joined since the last flush stay
  unacknowledged: their new owner reads them again), and the flush in flight is awaited before
  the consumer commits and leaves the group;
- a member evicted from its group (its session expired: a stalled process) does not flush on the
  revocation that follows; an owner in good standing does;
- a flush waits for the one in flight, so the states of a partition settle in order.

A real RocksDB partition (rocksdict) and the real join; the producer and faust's consumer are fakes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry
from rocksdict import Options, Rdict

from stream.contract.events import Event, encode_event
from stream.join.driver import RECENT_KEY, SWEPT_KEY, FunnelJoin, JoinTopics, unpack_recent
from stream.join.faust_store import META_PREFIX, OFFSET_KEY, FaustTableStore
from stream.join.flusher import Flusher
from stream.join.funnel import FunnelConfig, Swept, next_dues
from stream.join.state_codec import decode_state
from stream.ops.clock import FakeClock
from stream.ops.metrics import JoinerMetrics

TOPICS = JoinTopics(("imp", "clk", "app", "apr", "act"), "samples", "dead")
CHANGELOG = "aitm-joiner-funnels-changelog"
T0 = 1_767_225_600_000


class TP(NamedTuple):
    topic: str
    partition: int


class Message(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes

    @property
    def tp(self) -> TP:
        return TP(self.topic, self.partition)


class Sent(NamedTuple):
    topic: str
    partition: int
    offset: int

    async def last_offset(self) -> int:
        return self.offset


class FakeSender:
    """Records what would be produced; ``submit`` answers once ``release`` is set (the broker's ack)."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, int | None, bytes, bytes | None]] = []
        self.submitted: list[list[tuple[str, int | None, bytes, bytes | None]]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.offsets: dict[tuple[str, int], int] = {}

    def add(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
        self.pending.append((topic, partition, key, value))

    def add_all(self, records: Any) -> None:
        for topic, key, value in records:
            self.add(topic, key, value)

    def add_to(self, topic: str, partition: int, records: Any) -> None:
        for key, value in records:
            self.add(topic, key, value, partition)

    def seal(self, topic: str, partition: int, key: bytes, value: bytes | None = None) -> None:
        self.pending.append((topic, partition, key, value))

    def take(self) -> list[Any]:
        out, self.pending = self.pending, []
        return out

    async def submit(self, batch: list[Any]) -> list[Sent]:
        self.submitted.append(batch)
        await self.release.wait()
        sent = []
        for topic, partition, _, _ in batch:
            p = partition or 0
            self.offsets[(topic, p)] = self.offsets.get((topic, p), -1) + 1
            sent.append(Sent(topic, p, self.offsets[(topic, p)]))
        return sent

    def records_to(self, topic: str) -> int:
        return sum(1 for batch in self.submitted for r in batch if r[0] == topic)


class FakeConsumer:
    def __init__(self, tps: set[TP]) -> None:
        self.tps = tps
        self.acked: list[Message] = []
        self.fed: dict[tuple[TP, int], Message] = {}  # the records handed over, by partition and offset
        self._read_offset: dict[TP, int] = {}
        self.active: set[TP] = set(tps)

    @property
    def _active_partitions(self) -> set[TP]:  # faust's: partitions being read (not paused)
        return self.active

    def assignment(self) -> set[TP]:
        return set(self.tps)

    def ack(self, message: Message) -> None:  # faust's, for a record of its agent's
        self.acked.append(message)

    def ack_spans(self, spans: list[tuple[TP, int, int]]) -> None:  # the bulk loop's consumer's
        for tp, first, last in spans:
            self.acked.extend(self.fed[(tp, offset)] for offset in range(first, last + 1))

    def highwater(self, tp: TP) -> int:
        return 1_000


class FakeBackend:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.dbs: dict[int, Rdict] = {}

    def _db_for_partition(self, p: int) -> Rdict:
        if p not in self.dbs:
            self.dbs[p] = Rdict(str(self.path / f"p{p}"), Options(raw_mode=True))
        return self.dbs[p]

    def persisted_offset(self, tp: Any) -> int | None:  # faust's: the offset its recovery starts after
        raw = self._db_for_partition(tp.partition).get(OFFSET_KEY)
        return None if raw is None else int(raw)


class FakeChangelog:
    def get_topic_name(self) -> str:
        return CHANGELOG


class FakeTable:
    def __init__(self, path: Path) -> None:
        self.data = FakeBackend(path)
        self.changelog_topic = FakeChangelog()


class FakeApp:
    def __init__(self, consumer: FakeConsumer) -> None:
        self.consumer = consumer
        self.should_stop = False
        self.rebalancing = False  # faust's: from a revocation until the new assignment is recovered


class Rig:
    def __init__(self, path: Path, evicted: list[bool] | None = None) -> None:
        self.clock = FakeClock(T0)
        self.table = FakeTable(path)
        cfg = FunnelConfig()

        def due_of(value: bytes, swept: Swept) -> Any:
            return next_dues(decode_state(value), swept, cfg)

        self.join = FunnelJoin(
            cfg, TOPICS, lambda p: FaustTableStore(self.table, p, due_of), self.clock,
            JoinerMetrics(CollectorRegistry()), lateness_ms=(0, 0, 0, 0, 0), max_future_ms=0,
        )  # fmt: skip
        self.consumer = FakeConsumer({TP(t, 0) for t in TOPICS.events})
        self.app = FakeApp(self.consumer)
        self.evicted = evicted if evicted is not None else [False]
        self.flusher = Flusher(self.app, self.table, self.join, self.clock, 0.5,
                               member_lost=lambda: self.evicted[0])  # fmt: skip
        self.sender = FakeSender()
        self.flusher.sender = self.sender  # type: ignore[assignment]
        self.offset = 0

    def impression(self, iid: str, t: int = T0) -> Message:
        value = encode_event(Event(0, f"{iid}/0", iid, t, "bank_1", {"f": "v"}))
        msg = Message("imp", 0, self.offset, iid.encode(), value)
        self.offset += 1
        self.feed(msg)
        return msg

    def feed(self, msg: Message, behind: bool = False) -> None:
        """Hand ``msg`` to the flusher as the bulk fetch loop does (a batch of one, its span)."""
        self.consumer.fed[(msg.tp, msg.offset)] = msg
        self.flusher.handle_batch([(msg.topic, msg.partition, msg.key, msg.value, msg.offset, behind)],
                                  [(msg.tp, msg.offset, msg.offset)])  # fmt: skip


def finals_of(rig: Rig, iid: str) -> list[list[int]]:
    """Labels of the final samples sent for ``iid`` (JSON samples, TOPICS' encoding)."""
    sent = [json.loads(r[3]) for batch in rig.sender.submitted for r in batch
            if r[0] == "samples" and r[2] == iid.encode()]  # fmt: skip
    return [s["labels"] for s in sent if s["kind"] == "final"]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_flush_sends_the_states_then_acknowledges_their_source_records(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path)
        msg = rig.impression("i1")
        await rig.flusher.flush()
        await rig.flusher.close()
        assert rig.sender.records_to(CHANGELOG) >= 1  # the state (and the partition's seal)
        assert rig.consumer.acked == [msg]
        assert rig.table.data._db_for_partition(0).get(b"i1") is not None  # settled locally
        assert rig.table.data.persisted_offset(TP(CHANGELOG, 0)) == rig.sender.records_to(CHANGELOG) - 1

    asyncio.run(run())


def test_a_batchs_spans_and_an_agents_record_are_acknowledged_once_flushed(tmp_path: Path) -> None:
    """The bulk loop's batch (several records, their runs of offsets) is acknowledged as its spans
    (``ack_spans``), a record that came through faust's agent (``handle``) with faust's ``ack``:
    both only once the flush that covers them completes."""

    async def run() -> None:
        rig = Rig(tmp_path)
        imp = TP("imp", 0)
        msgs = [Message("imp", 0, o, f"b{o}".encode(), encode_event(Event(0, f"b{o}/0", f"b{o}", T0, "bank_1", {"f": "v"})))
                for o in (3, 4, 5, 9)]  # fmt: skip
        for m in msgs:
            rig.consumer.fed[(m.tp, m.offset)] = m
        rig.flusher.handle_batch([(m.topic, m.partition, m.key, m.value, m.offset, False) for m in msgs],
                                 [(imp, 3, 5), (imp, 9, 9)])  # fmt: skip
        agent = Message("imp", 0, 10, b"a10", encode_event(Event(0, "a10/0", "a10", T0, "bank_1", {"f": "v"})))
        rig.flusher.handle(agent, False)
        assert rig.flusher.next_offset[imp] == 11 and rig.flusher.pending == 5
        assert rig.consumer.acked == []  # not before the flush's acks
        await rig.flusher.flush()
        await rig.flusher.wait_inflight()
        assert rig.consumer.acked == [*msgs, agent]
        assert rig.flusher.pending == 0 and rig.flusher.unacked == [] and rig.flusher.unacked_messages == []

    asyncio.run(run())


def crash_copy(rig: Rig, name: str) -> dict[bytes, bytes | None]:
    """What a kill -9 would leave of partition 0's RocksDB now: its files as they are (the page
    cache included, which outlives the process), opened as a copy; the states ``i1``/``i2``, the
    swept lanes and the persisted offset found there."""
    src = rig.table.data.path / "p0"
    dst = rig.table.data.path.parent / f"crash-{name}"
    shutil.copytree(src, dst)
    db = Rdict(str(dst), Options(raw_mode=True))
    try:
        return {k: db.get(k) for k in (b"i1", b"i2", META_PREFIX + SWEPT_KEY, OFFSET_KEY)}
    finally:
        db.close()


def test_a_kill_leaves_the_states_and_the_offset_that_covers_them_in_rocksdb_together(tmp_path: Path) -> None:
    """After a kill -9 the local RocksDB holds the states, the persisted changelog offset that
    covers them (where faust's recovery resumes) and the swept lanes as one point - never an
    offset without its states (the offset is written in the states' own batch); once the joiner
    stops, everything settled is there."""

    async def run() -> None:
        rig = Rig(tmp_path / "run")
        rig.impression("i1")
        await rig.flusher.flush()
        await rig.flusher.wait_inflight()
        rig.clock.advance(1_000)
        rig.impression("i2")
        await rig.flusher.flush()
        await rig.flusher.wait_inflight()
        db = rig.table.data._db_for_partition(0)
        assert db.get(b"i1") is not None and db.get(b"i2") is not None  # settled: read by this joiner
        written = rig.table.data.persisted_offset(TP(CHANGELOG, 0))
        assert written is not None and written == rig.sender.records_to(CHANGELOG) - 1
        killed = crash_copy(rig, "running")
        present = {k for k, v in killed.items() if v is not None}
        assert present in (set(), set(killed)), f"a kill would keep {sorted(present)} without the rest"
        await rig.flusher.close()
        stopped = crash_copy(rig, "stopped")
        assert stopped[b"i1"] == db.get(b"i1") and stopped[b"i2"] == db.get(b"i2")
        assert stopped[OFFSET_KEY] == str(rig.sender.records_to(CHANGELOG) - 1).encode()  # its last flushes' too

    asyncio.run(run())


def test_a_revocation_puts_the_states_on_disk_before_faust_may_write_the_partition_with_its_log(
    tmp_path: Path,
) -> None:
    """If the partition comes back, faust's recovery writes its RocksDB with the write-ahead log; a
    kill -9 after that must still find the states this joiner settled before it gave the partition
    up (a store written without the log would lose them: an offset covering states that are gone)."""

    async def run() -> None:
        rig = Rig(tmp_path / "run")
        rig.impression("i1")
        await rig.flusher.revoked({TP(t, 0) for t in TOPICS.events})
        db = rig.table.data._db_for_partition(0)
        db.put(OFFSET_KEY, b"1000")  # faust recovers the partition after its next assignment (with the log)
        killed = crash_copy(rig, "after-recovery")
        assert killed[b"i1"] is not None and killed[b"i1"] == db.get(b"i1")

    asyncio.run(run())


def test_no_flush_goes_out_once_the_app_is_stopping(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path)
        rig.impression("i1")
        rig.app.should_stop = True  # SIGTERM: faust's stop has begun (the timers still tick)
        await rig.flusher.flush()
        await rig.flusher.wait_inflight()
        assert rig.sender.submitted == []
        assert rig.consumer.acked == []  # read again by the partition's next owner
        assert rig.table.data._db_for_partition(0).get(b"i1") is None

    asyncio.run(run())


def test_close_waits_for_the_flush_in_flight_and_stops_later_flushes(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path)
        first = rig.impression("i1")
        rig.sender.release.clear()  # the broker has not answered yet
        await rig.flusher.flush()
        await _settle()
        closing = asyncio.ensure_future(rig.flusher.close())
        await _settle()
        assert not closing.done()  # the consumer must not commit and leave before the acks
        rig.sender.release.set()
        await closing
        assert rig.consumer.acked == [first]
        rig.impression("i2")  # a record the bulk loop handed over while the fetcher stopped
        await rig.flusher.flush()  # the sweep timer, during the consumer's stop
        await rig.flusher.wait_inflight()
        assert len(rig.sender.submitted) == 1
        assert rig.consumer.acked == [first]

    asyncio.run(run())


def test_a_revocation_in_good_standing_flushes_what_is_pending(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path)
        msg = rig.impression("i1")
        await rig.flusher.revoked({TP(t, 0) for t in TOPICS.events})
        assert rig.sender.records_to(CHANGELOG) >= 1
        assert rig.consumer.acked == [msg]
        assert rig.join.parts == {}

    asyncio.run(run())


def test_an_evicted_member_writes_nothing_on_its_revocation(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path)
        rig.impression("i1")
        rig.evicted[0] = True  # its session expired; another member owns the partitions now
        await rig.flusher.revoked({TP(t, 0) for t in TOPICS.events})
        assert rig.sender.submitted == []
        assert rig.consumer.acked == []
        assert rig.join.parts == {}
        assert rig.table.data._db_for_partition(0).get(b"i1") is None
        rig.evicted[0] = False  # rejoined and assigned the partition again: the join starts afresh
        rig.impression("i2")
        await rig.flusher.flush()
        await rig.flusher.wait_inflight()
        assert rig.sender.records_to(CHANGELOG) >= 1

    asyncio.run(run())


def test_an_evicted_member_does_not_flush_before_it_learns_of_the_rebalance(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path)
        rig.impression("i1")
        rig.evicted[0] = True
        await rig.flusher.flush()  # the bulk loop's or the timer's, before the revocation
        await rig.flusher.wait_inflight()
        assert rig.sender.submitted == []
        assert rig.consumer.acked == []

    asyncio.run(run())


def test_a_flush_completing_after_an_eviction_is_neither_settled_nor_acknowledged(tmp_path: Path) -> None:
    """Its changelog records are out, but another member may have written after them: recording
    their offset as this member's persisted one would make its next recovery skip those writes."""

    async def run() -> None:
        rig = Rig(tmp_path)
        rig.impression("i1")
        rig.sender.release.clear()
        await rig.flusher.flush()
        await _settle()
        rig.evicted[0] = True  # the session expired while the broker took its time
        rig.sender.release.set()
        await rig.flusher.wait_inflight()
        assert rig.sender.records_to(CHANGELOG) >= 1
        assert rig.consumer.acked == []
        assert rig.table.data.persisted_offset(TP(CHANGELOG, 0)) is None
        assert rig.table.data._db_for_partition(0).get(b"i1") is None

    asyncio.run(run())


def test_a_partition_taken_over_is_swept_even_if_no_record_comes_after(tmp_path: Path) -> None:
    """A partition is joined from the moment it is assigned and recovered, not from its next
    record: a clicked funnel whose final waits for the applications topic to go idle gets it from
    the new owner of a partition that receives nothing more (a stream's quiet tail)."""

    async def run() -> None:
        rig = Rig(tmp_path)
        day = 86_400_000
        for step, iid, t in ((0, "i1", T0), (1, "i1", T0 + 60_000), (0, "x1", T0 + 4 * day),
                             (0, "x2", T0 + 4 * day + 60_000)):  # fmt: skip
            value = encode_event(Event(step, f"{iid}/{step}", iid, t, "bank_1", {"f": "v"} if step == 0 else None))
            rig.feed(Message(TOPICS.events[step], 0, rig.offset, iid.encode(), value))
            rig.offset += 1
        rig.consumer._read_offset = {TP(t, 0): 1_000 for t in TOPICS.events}  # read to their ends
        await rig.flusher.flush()
        await rig.flusher.revoked({TP(t, 0) for t in TOPICS.events})  # and assigned again
        rig.consumer.active = {TP(t, 0) for t in TOPICS.events}  # recovered: faust resumed them
        assert finals_of(rig, "i1") == []  # its applications lane has not gone idle yet
        for _ in range(3):  # the sweep timer, past the idle timeout; no record comes
            rig.clock.advance(16_000)
            await rig.flusher.flush()
            await rig.flusher.wait_inflight()
        assert finals_of(rig, "i1") == [[1, 0, 0, 0]]

    asyncio.run(run())


def test_the_next_owner_recovers_the_swept_lanes_of_the_last_flush(tmp_path: Path) -> None:
    """The swept lanes (and their recent event times) a flush stores go out with the flush after
    it; a revocation sends that one too, so what the changelog holds - what the next owner
    recovers - is what this member stored last, not the lanes of the flush before (whose finals
    it would emit again)."""

    async def run() -> None:
        rig = Rig(tmp_path)
        for n, t in enumerate((T0, T0 + 3_600_000, T0 + 7_200_000)):
            value = encode_event(Event(0, f"i{n}/0", f"i{n}", t, "bank_1", {"f": "v"}))
            rig.feed(Message("imp", 0, rig.offset, f"i{n}".encode(), value))
            rig.offset += 1
        await rig.flusher.revoked({TP(t, 0) for t in TOPICS.events})
        changelog: dict[bytes, bytes | None] = {}
        for batch in rig.sender.submitted:
            for topic, _, key, value in batch:
                if topic == CHANGELOG:
                    changelog[key] = value  # a compacted changelog: the last value of each key
        local = rig.table.data._db_for_partition(0)
        for name in (SWEPT_KEY, RECENT_KEY):
            assert local.get(META_PREFIX + name) is not None
            assert changelog.get(META_PREFIX + name) == local.get(META_PREFIX + name)

    asyncio.run(run())


def test_a_partition_still_recovering_is_joined_only_once_its_states_are_restored(tmp_path: Path) -> None:
    """A partition is joined from the moment its state is *recovered*: faust marks a new
    assignment's partitions active before it pauses them to restore their tables from the
    changelog, and a sweep timer firing in between must not build the partition's store (its due
    index) from the local RocksDB as it was before the restore: the funnels restored after would
    never come due - no first sample, no final (CI's two-joiner test lost 109 so)."""

    async def run() -> None:
        before = Rig(tmp_path / "b")  # the partition's previous owner
        before.impression("i1")
        await before.flusher.revoked({TP(t, 0) for t in TOPICS.events})  # it leaves the group
        changelog = [(key, value) for batch in before.sender.submitted for topic, _, key, value in batch
                     if topic == CHANGELOG]  # fmt: skip
        rig = Rig(tmp_path / "a")  # the new owner
        rig.app.rebalancing = True  # assigned, the partitions not yet paused for the restore
        await rig.flusher.flush()  # the sweep timer
        db = rig.table.data._db_for_partition(0)
        for key, value in changelog:  # faust's recovery restores the previous owner's writes
            if value is None:
                db.delete(key)
            else:
                db[key] = value
        rig.app.rebalancing = False  # restored, the partitions resumed
        day = 86_400_000
        rig.offset = 998  # the last records of the topic (FakeConsumer's high watermark is 1,000)
        rig.impression("x1", T0 + 4 * day)  # the stream goes on; nothing more for i1
        rig.impression("x2", T0 + 4 * day + 60_000)
        rig.consumer._read_offset = {TP(t, 0): 1_000 for t in TOPICS.events}
        for _ in range(3):  # past the idle timeout: the silent lanes follow the impressions
            rig.clock.advance(16_000)
            await rig.flusher.flush()
            await rig.flusher.wait_inflight()
        assert finals_of(rig, "i1") == [[0, 0, 0, 0]]

    asyncio.run(run())


class Killed(Exception):
    """The process died (kill -9) in the middle of a flush."""


class Builder:
    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes | None]] = []

    def append(self, key: bytes, value: bytes | None, timestamp: None) -> bool:
        self.records.append((key, value))
        return True

    def record_count(self) -> int:
        return len(self.records)


class Meta(NamedTuple):
    offset: int


class DyingProducer:
    """aiokafka's producer as ``BatchSender`` uses it: the record batches it submits land on the
    broker in submission order, until ``survive`` more have landed - then the process dies."""

    def __init__(self) -> None:
        self.landed: list[tuple[str, int, bytes, bytes | None]] = []
        self.offsets: dict[tuple[str, int], int] = {}
        self.survive: int | None = None

    def create_batch(self) -> Builder:
        return Builder()

    async def send_batch(self, builder: Builder, topic: str, partition: int) -> asyncio.Future[Meta]:
        if self.survive is not None:
            if self.survive == 0:
                raise Killed
            self.survive -= 1
        self.landed.extend((topic, partition, k, v) for k, v in builder.records)
        first = self.offsets.get((topic, partition), 0)
        self.offsets[(topic, partition)] = first + len(builder.records)
        fut: asyncio.Future[Meta] = asyncio.get_running_loop().create_future()
        fut.set_result(Meta(first))
        return fut


def test_a_kill_during_a_flush_never_loses_the_dead_letter_of_a_state_it_changed(tmp_path: Path) -> None:
    """A click held for an impression that never comes is dead-lettered by a sweep, which also
    deletes the held state. Whatever part of that flush reaches the broker before a kill -9, the
    dead letter is delivered - by this flush, or by the next owner redoing it from the changelog.
    If the state's change could land without it, the next owner would find nothing to redo (the
    real ``BatchSender`` over a producer that dies after each number of landed batches)."""
    from stream.kafka.sender import BatchSender

    day = 86_400_000

    async def run(survive: int) -> list[Any]:
        rig = Rig(tmp_path / f"a{survive}")
        producer = DyingProducer()
        rig.flusher.sender = BatchSender(producer, lambda topic, key: 0)
        click = encode_event(Event(1, "z1/1", "z1", T0, "bank_1", None))
        rig.feed(Message("clk", 0, 0, b"z1", click))  # held: no impression yet
        await rig.flusher.flush()
        await rig.flusher.wait_inflight()
        rig.offset = 998
        rig.impression("x1", T0 + day)  # the impressions' clock passes the click's grace period
        rig.impression("x2", T0 + day + 60_000)
        rig.consumer._read_offset = {TP(t, 0): 1_000 for t in TOPICS.events}
        producer.survive = survive
        try:
            for _ in range(3):
                rig.clock.advance(1_000)
                await rig.flusher.flush()
                await rig.flusher.wait_inflight()
        except Killed:
            pass
        delivered = [r for r in producer.landed if r[0] == "dead"]
        # the next owner: the changelog as it landed; the records not acknowledged are read again
        nxt = Rig(tmp_path / f"b{survive}")
        db = nxt.table.data._db_for_partition(0)
        for topic, _, key, value in producer.landed:
            if topic == CHANGELOG:
                if value is None:
                    db.delete(key)
                else:
                    db[key] = value
        acked = {m.offset for m in rig.consumer.acked if m.topic == "imp"}
        for offset, iid, t in ((998, "x1", T0 + day), (999, "x2", T0 + day + 60_000)):
            nxt.offset = offset
            if offset not in acked:
                nxt.impression(iid, t)
        nxt.consumer._read_offset = {TP(t, 0): 1_000 for t in TOPICS.events}
        for _ in range(3):
            nxt.clock.advance(1_000)
            await nxt.flusher.flush()
            await nxt.flusher.wait_inflight()
        return delivered + [r for batch in nxt.sender.submitted for r in batch if r[0] == "dead"]

    async def every_kill_point() -> None:
        for survive in range(8):
            dead = await run(survive)
            assert any(r[2] == b"z1" for r in dead), f"the dead letter was lost when {survive} batches landed"

    asyncio.run(every_kill_point())



class GatedSent(NamedTuple):
    topic: str
    partition: int
    offset: int
    gate: asyncio.Event
    refused: bool

    async def last_offset(self) -> int:
        await self.gate.wait()
        if self.refused:
            raise RuntimeError("the broker refused the batch")
        return self.offset


class GatedSender(FakeSender):
    """``submit`` queues at once, as the producer does; each submit's records are acknowledged
    when its own gate is set (in order of call)."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[asyncio.Event] = []
        self.fail_at: int | None = None  # the submit that the broker refuses
        self.slow_queue: asyncio.Event | None = None  # the first submit queues once it is set
        self.refuse_queue = False  # the next submit raises at once (the producer refuses the batches)

    async def submit(self, batch: list[Any]) -> list[Sent]:  # type: ignore[override]
        if self.slow_queue is not None:  # aiokafka's send_batch may wait (metadata, a full accumulator)
            slow, self.slow_queue = self.slow_queue, None
            await slow.wait()
        if self.refuse_queue:
            self.refuse_queue = False
            raise RuntimeError("the producer refused the batches")
        gate = asyncio.Event()
        self.gates.append(gate)
        self.submitted.append(batch)
        refused = len(self.gates) - 1 == self.fail_at
        sent: list[Any] = []
        for topic, partition, _, _ in batch:
            p = partition or 0
            self.offsets[(topic, p)] = self.offsets.get((topic, p), -1) + 1
            sent.append(GatedSent(topic, p, self.offsets[(topic, p)], gate, refused))
        return sent

    def topics_of(self, n: int) -> set[str]:
        return {r[0] for r in self.submitted[n]}


def _gated(tmp_path: Path) -> tuple[Rig, GatedSender]:
    """A rig whose broker answers each request when the test says so (``GatedSender``)."""
    rig = Rig(tmp_path)
    sender = GatedSender()
    rig.flusher.sender = sender  # type: ignore[assignment]
    return rig, sender


async def _ack_all(rig: Rig, sender: GatedSender) -> None:
    """The broker answers every request, those still to come included, until no flush is in flight."""
    while not all(f.done() for f in rig.flusher.inflight):
        for gate in sender.gates:
            gate.set()
        await _settle()
    await rig.flusher.wait_inflight()


def _bad(rig: Rig) -> Message:
    """A malformed record: its dead letter is a flush's output."""
    msg = Message("imp", 0, rig.offset, b"x", b"{not json")
    rig.offset += 1
    rig.feed(msg)
    return msg


def test_a_second_flush_goes_out_while_the_first_awaits_its_acks_and_completes_after_it(tmp_path: Path) -> None:
    """Two flushes in flight: the second's outputs are submitted after the first's, its changelog
    records only once the first has completed; records are acknowledged and states settled flush by
    flush; a third flush waits for the first to complete."""

    async def run() -> None:
        rig, sender = _gated(tmp_path)
        db = rig.table.data._db_for_partition(0)
        a, bad_a = rig.impression("i1"), _bad(rig)
        await rig.flusher.flush()  # flush 1: its outputs (a dead letter) submitted, not acknowledged
        await _settle()
        assert len(sender.submitted) == 1 and sender.topics_of(0) == {"dead"}
        b, bad_b = rig.impression("i2"), _bad(rig)
        await asyncio.wait_for(rig.flusher.flush(), 1)  # flush 2 does not wait for flush 1's acks
        await _settle()
        assert len(sender.submitted) == 2 and sender.topics_of(1) == {"dead"}
        third = asyncio.ensure_future(rig.flusher.flush())  # two in flight: it waits
        sender.gates[1].set()  # flush 2's outputs acknowledged: its changelog waits for flush 1
        await _settle()
        assert len(sender.submitted) == 2 and not third.done()
        assert rig.consumer.acked == [] and db.get(b"i1") is None and db.get(b"i2") is None
        sender.gates[0].set()  # flush 1's outputs acknowledged: its changelog goes out
        await _settle()
        assert len(sender.submitted) == 3 and sender.topics_of(2) == {CHANGELOG}
        sender.gates[2].set()  # flush 1 completes; then flush 2's changelog goes out
        await _settle()
        assert rig.consumer.acked == [a, bad_a] and db.get(b"i1") is not None and db.get(b"i2") is None
        assert third.done()
        assert len(sender.submitted) == 4 and sender.topics_of(3) == {CHANGELOG}
        sender.gates[3].set()
        await rig.flusher.wait_inflight()
        assert rig.consumer.acked == [a, bad_a, b, bad_b] and db.get(b"i2") is not None

    asyncio.run(run())


def test_a_flush_after_a_failed_one_settles_and_acknowledges_nothing(tmp_path: Path) -> None:
    async def run() -> None:
        rig, sender = _gated(tmp_path)
        sender.fail_at = 0  # flush 1's outputs are refused
        rig.impression("i1"), _bad(rig)
        await rig.flusher.flush()
        rig.impression("i2"), _bad(rig)
        await rig.flusher.flush()
        await _ack_all(rig, sender)  # logs both failures
        assert rig.consumer.acked == []  # read again by the partitions' next owner
        db = rig.table.data._db_for_partition(0)
        assert db.get(b"i1") is None and db.get(b"i2") is None
        assert all(CHANGELOG not in sender.topics_of(n) for n in range(len(sender.submitted)))

    asyncio.run(run())


def test_a_flushs_outputs_are_queued_after_the_previous_flushs_even_when_the_producer_is_slow(tmp_path: Path) -> None:
    """A partition's samples stay in order across flushes: the second flush's outputs wait until the
    first flush's are queued in the producer."""

    async def run() -> None:
        rig, sender = _gated(tmp_path)
        slow = sender.slow_queue = asyncio.Event()
        rig.impression("i1")
        first = _bad(rig)
        await rig.flusher.flush()
        rig.impression("i2")
        second = _bad(rig)
        await rig.flusher.flush()
        await _settle()
        assert sender.submitted == []  # the first flush's outputs are still being queued
        slow.set()
        await _settle()
        offsets = [[json.loads(r[3])["offset"] for r in batch] for batch in sender.submitted]
        assert offsets == [[first.offset], [second.offset]]
        await _ack_all(rig, sender)

    asyncio.run(run())


def test_two_callers_waiting_for_a_flush_slot_each_get_one(tmp_path: Path) -> None:
    """The fetch loop and the sweep timer both flush: while two flushes are in flight, both wait,
    and once the oldest completes neither takes a flush that is still in flight for done."""

    async def run() -> None:
        rig, sender = _gated(tmp_path)
        rig.impression("i1"), _bad(rig)
        await rig.flusher.flush()
        rig.impression("i2"), _bad(rig)
        await rig.flusher.flush()
        rig.impression("i3"), _bad(rig)
        waiting = [asyncio.ensure_future(rig.flusher.flush()) for _ in range(2)]
        await _settle()
        assert not any(w.done() for w in waiting)
        await _ack_all(rig, sender)
        await asyncio.gather(*waiting)  # neither raised
        await _ack_all(rig, sender)
        assert len(rig.consumer.acked) == 6

    asyncio.run(run())


def test_the_wait_for_flushes_in_flight_is_bounded_as_a_whole(tmp_path: Path) -> None:
    """A stop waits ``CLOSE_WAIT_S`` for a silent broker in all, not that long per flush in flight."""

    async def run() -> float:
        rig, _ = _gated(tmp_path)  # no gate is ever set: the broker never answers
        rig.impression("i1"), _bad(rig)
        await rig.flusher.flush()
        rig.impression("i2"), _bad(rig)
        await rig.flusher.flush()
        assert len(rig.flusher.inflight) == 2
        start = asyncio.get_running_loop().time()
        await rig.flusher.wait_inflight(1.0)
        waited = asyncio.get_running_loop().time() - start
        assert rig.flusher.inflight == [] and rig.consumer.acked == []
        return waited

    assert asyncio.run(run()) < 1.9  # one second for both (two seconds if per flush)


def test_a_flush_whose_outputs_could_not_be_queued_holds_no_later_flush(tmp_path: Path) -> None:
    """The first flush fails before its outputs are queued: the second does not wait for them
    forever - it fails too (nothing settled or acknowledged), and the wait for both ends."""

    async def run() -> None:
        rig, sender = _gated(tmp_path)
        sender.refuse_queue = True
        rig.impression("i1"), _bad(rig)
        await rig.flusher.flush()
        rig.impression("i2"), _bad(rig)
        await rig.flusher.flush()
        await _settle()
        for gate in sender.gates:
            gate.set()
        await asyncio.wait_for(rig.flusher.wait_inflight(), 5)
        assert rig.consumer.acked == []
        assert rig.table.data._db_for_partition(0).get(b"i2") is None

    asyncio.run(run())


def test_a_flush_during_a_wait_for_the_one_in_flight_still_completes_after_it(tmp_path: Path) -> None:
    """A revocation waits for the flush in flight (``wait_inflight`` takes it off the list) while the
    sweep timer flushes: the new flush's changelog still waits for the first flush to complete."""

    async def run() -> None:
        rig, sender = _gated(tmp_path)
        rig.impression("i1"), _bad(rig)
        await rig.flusher.flush()
        await _settle()
        waiting = asyncio.ensure_future(rig.flusher.wait_inflight())
        await _settle()
        assert rig.flusher.inflight == []  # taken by the wait, still in flight
        rig.impression("i2"), _bad(rig)
        await rig.flusher.flush()
        await _settle()
        assert len(sender.submitted) == 2
        sender.gates[1].set()  # the second flush's outputs acknowledged; the first's are not
        await _settle()
        assert len(sender.submitted) == 2  # its changelog waits for the first flush
        await _ack_all(rig, sender)
        while not waiting.done():
            for gate in sender.gates:
                gate.set()
            await _settle()
        assert [sender.topics_of(n) for n in range(len(sender.submitted))][2:] == [{CHANGELOG}, {CHANGELOG}]

    asyncio.run(run())


def test_a_kill_between_two_flushes_in_flight_restarts_from_the_lanes_of_the_one_that_completed(
    tmp_path: Path,
) -> None:
    """The lanes' recent event times are stored with the swept lanes of the same flush, as they were
    when that flush was taken (docs/joiner.md, "Event time"). With two flushes in flight, the first
    one's completion stores the first one's: the second's snapshot already counts impressions whose
    states only the second flush settles. After a kill -9 between the two, the next owner's
    impressions lane would be hours ahead of the states it holds, and the records read again would
    be judged against it - ``bench chaos --seed 41 --delivery batch-feeds --cpu-hog``: clicks read
    again before their impressions, dead-lettered "no impression for this click within the grace
    period", their funnels' finals then without them (17 and 218 wrong labels in two runs)."""
    hour = 3_600_000

    async def run() -> None:
        rig, sender = _gated(tmp_path)
        rig.impression("a1", T0)
        rig.impression("a2", T0 + 60_000)
        await rig.flusher.flush()  # flush 1: impressions up to T0 + 1 min
        await _settle()
        first = len(sender.gates)  # flush 1's requests so far
        rig.impression("z", T0 + 2 * hour)
        click = encode_event(Event(1, "z/1", "z", T0 + 2 * hour + 60_000, "bank_1", None))
        rig.feed(Message("clk", 0, 0, b"z", click))
        rig.impression("y1", T0 + 5 * hour)
        rig.impression("y2", T0 + 5 * hour + 60_000)
        rig.clock.advance(1_000)
        await rig.flusher.flush()  # flush 2: its snapshot counts impressions up to T0 + 5 h
        await _settle()
        second = len(sender.gates)  # and flush 2's: never answered
        assert len(rig.flusher.inflight) == 2
        for _ in range(20):  # the broker answers flush 1's requests only
            if rig.flusher.inflight[0].done():
                break
            for n, gate in enumerate(sender.gates):
                if n < first or n >= second:
                    gate.set()
            await _settle()
        assert rig.flusher.inflight[0].done() and not rig.flusher.inflight[1].done()
        db = rig.table.data._db_for_partition(0)
        assert db.get(b"a1") is not None and db.get(b"z") is None  # flush 1 settled, flush 2 not
        recent = unpack_recent(db.get(META_PREFIX + RECENT_KEY))
        assert recent[0] == [T0, T0 + 60_000]  # as flush 1 was taken, not flush 2
        # kill -9 now: the next owner starts from the local RocksDB and reads flush 2's records again
        rig.join.forget(0)
        out: list[Any] = []
        rig.join.on_record("clk", 0, b"z", click, True, out, offset=0)  # its topic read first
        rig.join.on_record("imp", 0, b"z", encode_event(Event(0, "z/0", "z", T0 + 2 * hour, "bank_1", {"f": "v"})),
                           True, out, offset=2)  # fmt: skip
        assert [o for o in out if o.topic == "dead"] == []
        state = rig.join.part(0).store.get(b"z")
        assert state is not None
        assert decode_state(state).times[0] == T0 + 2 * hour + 60_000  # the click counts

    asyncio.run(run())
