"""``stream.kafka.faust_bulk``: the bulk fetch loop is installed as a subclass of faust's own consumer,
and it is refused - and this test fails - on any faust-streaming but the one its loop copies."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections import defaultdict
from typing import Any, NamedTuple

import faust
import pytest
from faust.transport.consumer import Consumer as BaseConsumer
from faust.transport.drivers.aiokafka import Consumer
from faust.transport.utils import DefaultSchedulingStrategy
from faust.types import TP

from stream.kafka import faust_bulk
from stream.kafka.faust_bulk import FAUST_VERSION, bulk_consumer

# sha256 of the source of the faust internals the bulk loop copies or calls, in faust-streaming
# 0.15.3. A change in any of them means stream/kafka/faust_bulk.py must be re-checked against
# faust's new loop (then update the digests here).
FAUST_INTERNALS = {
    "_drain_messages": "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417",
    "getmany": "4b168d84882a70d6e3e2f9804430a63b92f8fd117d3187cbb4aeb54305bda34e",
    "_wait_next_records": "6218e1969a636b3ff504ad1b8e7ad58a113572e43d746cc96d684ed5153032c6",
    "_to_message": "6a0ee0c2072f534ccadb9ff28a90f43b09484c5ec393ad0cac976c996e7704d3",
    "_add_gap": "4df2573ded7c1c2cde04dc6bde6d4480cb5875ef565256e56966b585ae39b1c1",
    "perform_seek": "0e8c130ff4b0afd82c0be9c5fd831316e10febc62c94032833911096e156d7c6",
    "ack": "5fcf41cf45153475de3790dc56fec1b83335956dc8b3bf7ff6bbb2b57627f03f",  # BulkConsumer.ack_spans copies it
}


async def _flush() -> None:
    return None


def test_bulk_consumer_subclasses_faust_consumer_and_overrides_only_the_fetch_loop() -> None:
    cls = bulk_consumer(Consumer, ["impressions"], lambda batch, spans: False, _flush)
    assert issubclass(cls, Consumer)
    overridden = {name for name, v in vars(cls).items() if callable(v) and not name.startswith("__")}
    added = {"ack_spans", "_whole_fetch", "_hand_whole"}
    assert overridden == {"_drain_messages", "_new_consumer_thread"} | added
    assert not any(hasattr(Consumer, name) for name in added)  # additions, not overrides


def test_bulk_consumer_refuses_a_consumer_without_the_internals_it_uses() -> None:
    class Other:
        pass

    with pytest.raises(TypeError, match="faust-streaming changed"):
        bulk_consumer(Other, ["impressions"], lambda batch, spans: False, _flush)


def test_the_installed_faust_is_the_one_the_bulk_loop_copies() -> None:
    """Fails loudly on another faust-streaming: its version, or the source of the internals the
    loop copies, differ from what faust_bulk.py was written against."""
    assert faust.__version__ == FAUST_VERSION, (
        f"faust-streaming {faust.__version__} installed; stream/kafka/faust_bulk.py copies {FAUST_VERSION}'s loop"
    )
    changed = [
        name for name, digest in FAUST_INTERNALS.items()
        if hashlib.sha256(inspect.getsource(getattr(BaseConsumer, name)).encode()).hexdigest() != digest
    ]  # fmt: skip
    assert not changed, f"faust's {changed} changed: re-check stream/kafka/faust_bulk.py against them"


def test_fetch_order_is_faust_schedulers_round_robin_on_random_fetches() -> None:
    """The bulk loop takes a fetch's records in ``fetch_order`` when faust's scheduler is its
    default one; the order must be that scheduler's, record for record (topics round robin in the
    order they first appear, each topic's partitions round robin, empty and exhausted ones skipped)."""
    import random

    rng = random.Random(7)
    topics = ["impressions", "clicks", "applications", "approvals", "activations", "funnels-changelog"]
    for _ in range(400):
        records: dict[TP, list[Record]] = {}
        for _ in range(rng.randint(1, 14)):
            tp = TP(rng.choice(topics), rng.randint(0, 5))
            if tp not in records:
                records[tp] = [Record(rng.randint(0, 10**6)) for _ in range(rng.choice([0, 1, 2, 3, 7, 40, 300]))]
        expected = list(DefaultSchedulingStrategy().iterate(records))
        assert faust_bulk.fetch_order(records) == expected


@pytest.mark.parametrize("one_record", [False, True], ids=["whole-fetch", "one-record-loop"])
def test_a_fetch_of_many_partitions_is_handled_whole_in_the_schedulers_order(one_record: bool) -> None:
    """Five topics over three partitions, of uneven lengths, in batches of at most YIELD_EVERY:
    every record handed over once, in faust's order, each with its ``behind`` flag and its span."""
    tps = [TP(t, p) for t in ("impressions", "clicks", "approvals") for p in range(3)]
    sizes = {tp: n for tp, n in zip(tps, [130, 90, 150, 12, 0, 30, 1, 2, 3], strict=True)}
    fetch = {tp: [Record(o) for o in range(5, 5 + n)] for tp, n in sizes.items()}
    got: list[tuple[TP, int, bool]] = []
    sizes_seen: list[int] = []
    spans_seen: list[Any] = []

    def handle(batch: list[Any], spans: list[Any]) -> bool:
        sizes_seen.append(len(batch))
        got.extend((TP(r[0], r[1]), r[4], r[5]) for r in batch)
        spans_seen.append(spans)
        assert spans == faust_bulk.spans_of([TP(r[0], r[1]) for r in batch], batch)
        return False

    class Many(FakeFaustConsumer):
        async def _wait_next_records(self, timeout: float) -> tuple[dict[TP, list[Record]], set[TP]]:
            if self.script:
                self.script.pop(0)
                return fetch, set(tps)
            self._stopped.set()
            return {}, set(tps)

        def highwater(self, tp: TP) -> int:
            return 5 + sizes[tp]  # read to its end by this fetch

    cls = _loop(Many, ["impressions", "clicks", "approvals"], handle, one_record)
    consumer = cls(FakeApp(), [], 0, 0)
    consumer.script = [_nothing]
    asyncio.run(consumer._drain_messages(consumer))
    order = list(DefaultSchedulingStrategy().iterate(fetch))
    assert [(tp, r.offset) for tp, r in order] == [(tp, o) for tp, o, _ in got]
    assert all(behind == (o + 1 < 5 + sizes[tp]) for tp, o, behind in got)
    assert max(sizes_seen) == faust_bulk.YIELD_EVERY and sum(sizes_seen) == sum(sizes.values())
    assert all(len({tp for tp, _, _ in spans}) == len(spans) for spans in spans_seen)  # one run per partition
    assert {tp: consumer._read_offset[tp] for tp in tps if sizes[tp]} == {tp: 4 + n for tp, n in sizes.items() if n}


def test_bulk_consumer_refuses_another_faust_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faust_bulk.faust, "__version__", "0.16.0")
    with pytest.raises(TypeError, match=r"copies faust-streaming 0\.15\.3's consumer loop, and 0\.16\.0 is installed"):
        bulk_consumer(Consumer, ["impressions"], lambda batch, spans: False, _flush)


class Record(NamedTuple):
    offset: int
    key: bytes | None = None
    value: bytes | None = None


class Message(NamedTuple):
    tp: TP
    offset: int

    @property
    def topic(self) -> str:
        return self.tp.topic


class FakeFlowControl:
    def is_active(self) -> bool:
        return True


class FakeTopics:
    def acks_enabled_for(self, topic: str) -> bool:
        return True


class FakeApp:
    def __init__(self) -> None:
        self.consumer_generation_id = 1
        self.rebalancing = False
        self.monitor = None
        self.flow_control = FakeFlowControl()
        self.topics = FakeTopics()
        self.should_stop = False


class FakeDiag:
    def set_flag(self, flag: str) -> None:
        pass

    def unset_flag(self, flag: str) -> None:
        pass


class FakeFaustConsumer:
    """What the bulk loop uses of faust's consumer, over a scripted partition: ``fetches`` are
    the batches the fetcher returns, each after ``before`` (a step of faust's rebalance) ran; a
    seek (``perform_seek``, to the committed offset) makes the next fetch start there."""

    consumer_stopped_errors = (RuntimeError,)

    def __init__(self, app: FakeApp, log: list[int], committed: int, end: int) -> None:
        self.app, self.log, self.committed, self.end = app, log, committed, end
        self.position = committed
        self.script: list[Any] = []
        self._read_offset: dict[TP, int | None] = defaultdict(lambda: None)
        self._stopped = asyncio.Event()
        self.callback = None
        self.diag = FakeDiag()
        self.scheduler = DefaultSchedulingStrategy()
        self.flow_active = True
        self.should_stop = False
        self._buffered_partitions: set[TP] = set()
        self._commit_every = None
        self._n_acked = 0
        self.gaps: list[tuple[int, int]] = []
        self.tp = TP("impressions", 0)
        self.seek_pending: int | None = None

    async def _wait_next_records(self, timeout: float) -> tuple[dict[TP, list[Record]], set[TP]]:
        if not self.script:
            self._stopped.set()
            return {}, {self.tp}
        step = self.script.pop(0)
        step(self)
        batch = [Record(o) for o in range(self.position, min(self.position + 5, self.end))]
        self.position += len(batch)
        if self.seek_pending is not None:  # a batch fetched before the seek came first
            self.position, self.seek_pending = self.seek_pending, None
        return {self.tp: batch}, {self.tp}

    def _to_message(self, tp: TP, record: Record) -> Message:
        return Message(tp, record.offset)

    def ack(self, message: Any) -> bool:  # faust's is checked by its digest above
        return True

    async def _add_gap(self, tp: TP, start: int, end: int) -> None:
        self.gaps.append((start, end))

    def highwater(self, tp: TP) -> int:
        return self.end

    async def perform_seek(self) -> None:
        self.position = self.committed
        self._read_offset[self.tp] = self.committed

    async def commit(self) -> bool:
        return True


def _loop(base: type, topics: list[str], handle: Any, one_record: bool = False, flush: Any = _flush) -> Any:
    """``bulk_consumer`` over ``base``; ``one_record``: every fetch taken by the one-record loop
    (``_whole_fetch`` declines it), to check the two hand the same records over."""
    cls = bulk_consumer(base, topics, handle, flush)
    if one_record:
        cls._whole_fetch = lambda self, records, active: None
    return cls


def run_bulk_loop(script: list[Any], committed: int = 10, end: int = 30, batches: list[list[int]] | None = None,
                  one_record: bool = False) -> tuple[list[int], FakeFaustConsumer]:  # fmt: skip
    handled: list[int] = []
    app = FakeApp()

    def handle(batch: list[Any], spans: list[Any]) -> bool:
        handled.extend(r[4] for r in batch)
        if batches is not None:
            batches.append([r[4] for r in batch])
        return False

    cls = _loop(FakeFaustConsumer, ["impressions"], handle, one_record)
    consumer = cls(app, handled, committed, end)
    consumer.script = list(script)
    asyncio.run(consumer._drain_messages(consumer))
    return handled, consumer


def _rebalance_starts(c: FakeFaustConsumer) -> None:
    c.app.rebalancing = True


def _faust_seeks_and_ends_it(c: FakeFaustConsumer) -> None:
    # faust's _resume_streams: partitions resumed, perform_seek, then the rebalance ends; the
    # fetcher had a batch from beyond the committed offset in hand, which comes first
    c.seek_pending = c.committed
    c._read_offset[c.tp] = c.committed
    c.app.rebalancing = False


def _nothing(c: FakeFaustConsumer) -> None:
    pass


@pytest.mark.parametrize("one_record", [False, True], ids=["whole-fetch", "one-record-loop"])
def test_records_fetched_during_a_rebalance_are_read_again_once_it_is_over(one_record: bool) -> None:
    """faust resumes a new assignment's partitions (and its flow) before the seek that ends its
    rebalance; a record handled in between may be one that seek rewinds past, so that the next
    batch looks like a gap faust counts as read: records never joined (bench rebalance seed 56
    logged 98 and 40 such impressions). They are held back and read again after the rebalance."""
    # the records fetched before faust's seek, then the batch prefetched after it, then more
    handled, consumer = run_bulk_loop(
        [_rebalance_starts, _nothing, _faust_seeks_and_ends_it, _nothing, _nothing, _nothing, _nothing, _nothing],
        one_record=one_record,
    )
    assert consumer.gaps == []  # nothing counted as read without being handled
    assert handled == list(range(10, 30))  # every record joined once, in order, from the committed offset


@pytest.mark.parametrize("one_record", [False, True], ids=["whole-fetch", "one-record-loop"])
def test_without_a_rebalance_every_record_is_handled_once_in_order(one_record: bool) -> None:
    handled, consumer = run_bulk_loop([_nothing] * 5, one_record=one_record)
    assert handled == list(range(10, 30)) and consumer.gaps == []



@pytest.mark.parametrize("one_record", [False, True], ids=["whole-fetch", "one-record-loop"])
def test_a_fetch_is_handed_over_as_one_batch(one_record: bool) -> None:
    batches: list[list[int]] = []
    handled, _ = run_bulk_loop([_nothing] * 4, batches=batches, one_record=one_record)
    assert handled == list(range(10, 30))
    assert batches == [[10, 11, 12, 13, 14], [15, 16, 17, 18, 19], [20, 21, 22, 23, 24], [25, 26, 27, 28, 29]]


def test_the_records_before_an_await_are_handed_over_before_it() -> None:
    """A batch never spans an await of the loop: the records before a gap (faust's ``_add_gap``
    counts the offsets between as read) are joined before faust hears of the gap, as the
    one-record loop did, so a rebalance in that await finds them handled."""
    batches: list[list[int]] = []
    handled_at_gap: list[int] = []
    app = FakeApp()
    handled: list[int] = []

    def handle(batch: list[Any], spans: list[Any]) -> bool:
        handled.extend(r[4] for r in batch)
        batches.append([r[4] for r in batch])
        assert spans == faust_bulk.spans_of([TP(r[0], r[1]) for r in batch], batch)
        return False

    class Gappy(FakeFaustConsumer):
        async def _wait_next_records(self, timeout: float) -> tuple[dict[TP, list[Record]], set[TP]]:
            if self.script:
                self.script.pop(0)
                return {self.tp: [Record(o) for o in (10, 11, 12, 15, 16)]}, {self.tp}
            self._stopped.set()
            return {}, {self.tp}

        async def _add_gap(self, tp: TP, start: int, end: int) -> None:
            handled_at_gap.append(len(handled))
            await super()._add_gap(tp, start, end)

    cls = bulk_consumer(Gappy, ["impressions"], handle, _flush)
    consumer = cls(app, handled, 10, 30)
    consumer.script = [_nothing]
    asyncio.run(consumer._drain_messages(consumer))
    assert consumer.gaps == [(13, 15)]
    assert batches == [[10, 11, 12], [15, 16]]  # (offsets skipped within a fetch: the one-record loop's)
    assert handled_at_gap == [3]


class _Topics:
    def acks_enabled_for(self, topic: str) -> bool:
        return topic != "no-acks"


class _AckApp:
    topics = _Topics()


def _bare_consumer(cls: type) -> Any:
    """A faust consumer with the state its ``ack`` keeps (as faust's ``Consumer.__init__`` sets it)."""
    from weakref import WeakSet

    c: Any = object.__new__(cls)
    c.app = _AckApp()
    c._acked, c._acked_index = defaultdict(list), defaultdict(set)
    c._committed_offset = defaultdict(lambda: None)
    c._unacked_messages, c._waiting_for_ack, c._n_acked = WeakSet(), None, 0
    return c



def test_ack_spans_leaves_faust_state_as_its_own_ack_one_record_at_a_time() -> None:
    """``BulkConsumer.ack_spans`` (a flush's runs of offsets, one lock) against faust's
    ``Consumer.ack`` of each record in turn: offsets below the committed one, spans acked twice or
    overlapping ones acked before, a topic without acks, several partitions."""
    from faust.types.tuples import ConsumerMessage

    cls = bulk_consumer(Consumer, ["impressions"], lambda batch, spans: False, _flush)
    imp, clk, off = TP("impressions", 0), TP("clicks", 1), TP("no-acks", 0)
    spans = [(imp, 3, 8), (clk, 4, 4), (clk, 2, 2), (off, 1, 1), (imp, 5, 10), (clk, 7, 9), (imp, 0, 2)]
    ones, many = _bare_consumer(cls), _bare_consumer(cls)
    for c in (ones, many):
        c._committed_offset[imp] = 4  # 3 is below it: not recorded
    for tp, first, last in spans:
        for offset in range(first, last + 1):
            Consumer.ack(ones, ConsumerMessage(tp.topic, tp.partition, offset, 0.0, 0, None, b"k", b"v", None, tp=tp))
    assert many.ack_spans(spans) == ones._n_acked == 12
    assert dict(many._acked) == dict(ones._acked) and dict(many._acked_index) == dict(ones._acked_index)
    assert ones._acked[imp] == [4, 5, 6, 7, 8, 9, 10]
    assert many.ack_spans(spans) == 0  # acked already: nothing changes
    assert many._n_acked == 12


def test_spans_of_a_batch_are_each_partitions_runs_of_consecutive_offsets() -> None:
    a, b = TP("impressions", 0), TP("clicks", 0)
    tps = [a, b, a, a, b, a, b]
    batch = [(tp.topic, tp.partition, None, b"v", offset, False) for tp, offset in zip(tps, [4, 9, 5, 6, 10, 9, 12], strict=True)]
    assert faust_bulk.spans_of(tps, batch) == [(a, 4, 6), (b, 9, 10), (a, 9, 9), (b, 12, 12)]


def test_fetch_batches_is_its_python_twin_on_random_fetches() -> None:
    """The compiled ``fetch_batches`` against ``fetch_batches_py`` (``fetch_order``, whose order is
    faust's scheduler's, cut into batches): records as ``LeanRecord``s and as other objects (read
    by name), topics and partitions of uneven lengths and in any order, empty ones, high
    watermarks known or not, any first batch and batch size."""
    import random

    from stream.kafka import _records
    from stream.kafka.lean_fetch import LeanRecord

    rng = random.Random(11)
    for _ in range(400):
        records: dict[TP, list[Any]] = {}
        highwaters: dict[TP, int | None] = {}
        for _ in range(rng.randint(1, 10)):
            tp = TP(rng.choice(["impressions", "clicks", "activations", "approvals"]), rng.randint(0, 3))
            first = rng.randint(0, 10**12)
            n = rng.choice([0, 1, 2, 5, 40, 130])
            lean = rng.random() < 0.7
            records[tp] = [
                LeanRecord(tp.topic, tp.partition, o, 0, 0, b"k%d" % o, b"v%d" % o, None, 2, 2, ()) if lean
                else Record(o, rng.choice([None, b"key"]), rng.choice([None, b"", b"value"]))
                for o in range(first, first + n)
            ]  # fmt: skip
            highwaters[tp] = rng.choice([None, first, first + n - 1, first + n, first + n + 5])
        first_size, size = rng.randint(1, 120), rng.choice([1, 7, 100])
        got = _records.fetch_batches(records, highwaters, first_size, size)
        assert got == faust_bulk.fetch_batches_py(records, highwaters, first_size, size)
        flat = [(TP(r[0], r[1]), r[4]) for batch, _ in got for r in batch]
        assert flat == [(tp, r.offset) for tp, r in DefaultSchedulingStrategy().iterate(records)]
        assert [len(b) for b, _ in got][:1] in ([], [min(first_size, len(flat))])


class ScriptedFetches(FakeFaustConsumer):
    """Fetches of several partitions of three topics from a seeded script: runs of consecutive
    offsets, now and then one with offsets skipped (a gap) or starting past the read offset; the
    handler acks what it is given, so commits fall due (``commit_every``), and some flushes begin a
    rebalance (a new generation: the loop stops, and the next fetch reads from the read offsets)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.rng: Any = None
        self.fetches_left = 0
        self.next_pos: dict[TP, int] = {}
        self.events: list[Any] = []
        self._commit_every = 37

    async def _wait_next_records(self, timeout: float) -> tuple[dict[TP, list[Any]], set[TP]]:
        rng = self.rng
        if self.fetches_left == 0:
            self._stopped.set()
            return {}, set()
        self.fetches_left -= 1
        fetch: dict[TP, list[Any]] = {}
        for tp in rng.sample(sorted(self.next_pos), rng.randint(1, len(self.next_pos))):
            read = self._read_offset[tp]
            pos = self.next_pos[tp] if read is None else max(self.next_pos[tp], read + 1)
            offsets = list(range(pos, pos + rng.choice([1, 3, 30, 120])))
            if len(offsets) > 2 and rng.random() < 0.1:
                del offsets[rng.randrange(1, len(offsets) - 1)]  # compacted away
            if rng.random() < 0.05:
                offsets = [o + 3 for o in offsets]  # a gap before the run
            fetch[tp] = [Record(o, b"k", b"v") for o in offsets]
            self.next_pos[tp] = offsets[-1] + 1
        return fetch, set(self.next_pos)

    def highwater(self, tp: TP) -> int:
        return self.next_pos[tp] + 2

    async def commit(self) -> bool:
        self.events.append(("commit", self._n_acked))
        return True


@pytest.mark.parametrize("seed", range(40))
def test_the_whole_fetch_path_hands_over_as_the_one_record_loop(seed: int) -> None:
    """The same scripted fetches through the loop as it is and with every fetch taken by the
    one-record loop: the same batches, spans, flushes, commits, gaps and read offsets."""
    import random

    def run(one_record: bool) -> tuple[list[Any], dict[TP, int | None], list[tuple[int, int]]]:
        rng = random.Random(seed)
        app = FakeApp()
        app.rebalancing = False
        holder: list[Any] = []
        calls = 0

        def handle(batch: list[Any], spans: list[Any]) -> bool:
            nonlocal calls
            calls += 1
            c = holder[0]
            c.events.append(("batch", list(batch), list(spans)))
            c._n_acked += len(batch)
            return calls % 3 == 0

        async def flush() -> None:
            c = holder[0]
            c.events.append(("flush",))
            if rng.random() < 0.1:
                app.consumer_generation_id += 1  # a rebalance begins

        cls = _loop(ScriptedFetches, ["impressions", "clicks", "approvals"], handle, one_record, flush)
        whole_fetch = cls._whole_fetch

        def counted(self: Any, records: Any, active: Any) -> Any:
            got = whole_fetch(self, records, active)
            taken[got is not None] += 1
            return got

        cls._whole_fetch = counted
        consumer = cls(app, [], 0, 0)
        holder.append(consumer)
        consumer.rng = rng
        consumer.fetches_left = 12
        consumer.next_pos = {TP(t, p): rng.randint(0, 50) for t in ("impressions", "clicks", "approvals")
                             for p in range(3)}  # fmt: skip
        asyncio.run(consumer._drain_messages(consumer))
        return consumer.events, dict(consumer._read_offset), consumer.gaps

    taken = [0, 0]  # fetches: by the one-record loop, whole
    whole = run(False)
    assert taken[1] > 0
    one = run(True)
    assert whole == one
    assert sum(len(e[1]) for e in whole[0] if e[0] == "batch") > 100
