"""The label store of the joiner process: one partition of a faust Table's RocksDB, whose writes
go out as changelog records in the joiner's own batches (``stream.join.flusher``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from faust.stores.rocksdb import Store as FaustRocksStore
from faust.types import TP
from rocksdict import WriteBatch

from stream.join import fast
from stream.join.driver import SWEPT_KEY, unpack_swept
from stream.join.funnel import Dues, Swept
from stream.join.store import new_due_index

META_PREFIX = b"\x00"  # table keys of metadata; impression ids are printable
# a tombstone that ends each flush's changelog records of a partition in a batch of its own
# (``BatchSender.seal``): Tansu's ListOffsets reports the start of the last batch + 1, and a new
# owner's recovery stopped there, missing the rest of the batch - states whose source records
# were acknowledged, so their funnels were lost on a rebalance (the two-joiner test)
SEAL_KEY = META_PREFIX + b"seal"
_MISSING: Any = object()
_fast = fast._fastjoin if fast.AVAILABLE else None  # store_lookup / store_put_many: get_many's and put_many's loops
# faust's key of a partition's persisted changelog offset in its RocksDB (what its recovery reads)
OFFSET_KEY: bytes = FaustRocksStore.offset_key
# the writes of a partition's last settled flushes, kept readable in memory: a backlog read races
# through event time, and a sweep's states are mostly ones a flush or two before wrote (a
# RocksDB multi-get cost ~1-10 us a key in ``bench.join_profile``; issue 16, round 19)
SETTLED_KEPT = 2
log = logging.getLogger(__name__)


class FaustTableStore:
    """``LabelStore`` over one partition of a faust Table's RocksDB, changelogged in our outbox.

    Faust's own ``table[key] = value`` costs about 0.3 ms per write (a FutureMessage through its
    producer buffer, two callbacks and a RocksDB offset write per record), which capped the
    join near 1.8k events/s. So a write - value None for a delete - goes into ``outbox``; at
    each flush ``drain()`` hands the outbox over (it stays readable as ``sending``), the agent
    sends it to the table's changelog topic and partition with the raw producer, and once it is
    acknowledged ``settle()`` writes it into the partition's rocksdict in one ``WriteBatch``, with
    the acked changelog offset as the partition's persisted offset (faust's key). Faust's recovery
    reads that changelog exactly as if it had written it. The source records behind those
    writes, and their outputs, are acknowledged in the same step (see ``build_app``): after a
    kill -9 the local RocksDB holds no write whose outputs may be lost, so the replayed records
    redo them. Reads look in ``outbox``, then in ``sending`` (the drains not yet settled, the newest
    first: two flushes may be in flight), then in ``settled`` (the last ``SETTLED_KEPT`` drains
    settled, the newest first: what RocksDB holds for their keys), then RocksDB. The due index (a
    heap per lane) is in memory, rebuilt on creation.

    The writes keep RocksDB's write-ahead log. Without it (as Kafka Streams writes its stores;
    the log was ~80% of a write's cost) the two-joiner rebalance bench with every leave a kill -9
    lost labels in two runs of two (docs/joiner.md, round 18): not kept.
    """

    def __init__(self, table: Any, partition: int, due_of: Callable[[bytes, Swept], Dues]) -> None:
        self._table = table
        self.partition = partition
        self._db = table.data._db_for_partition(partition)
        self._index = new_due_index()
        # the keys of the states held: ``len`` counts them (the due index holds a key only while
        # it has a due time: not between ``pop_due`` and the sweep's ``reschedule``)
        self._keys: set[bytes] = set()
        # changelog records not yet sent: the latest value per key (None: delete). A compacted
        # changelog only needs the last write of a key, so writes between two sends coalesce.
        self.outbox: dict[bytes, bytes | None] = {}
        # drained, not yet acknowledged and settled: one dict per drain, oldest first
        self.sending: list[dict[bytes, bytes | None]] = []
        # the last SETTLED_KEPT drains settled into RocksDB, oldest first: what RocksDB holds for
        # their keys, unless a newer drain (kept, or still sending) wrote the key again
        self.settled: list[dict[bytes, bytes | None]] = []
        swept = unpack_swept(self.get_meta(SWEPT_KEY))
        for key, value in self._db.items():
            if key.startswith(META_PREFIX) or key.startswith(b"__faust"):
                continue
            self._keys.add(bytes(key))
            self._index.set(bytes(key), due_of(bytes(value), swept))
        log.info("partition %d: %d states read from the local RocksDB (persisted changelog offset %s), swept %s",
                 partition, len(self._keys), self._persisted(), swept)  # fmt: skip

    def _persisted(self) -> int | None:
        try:
            offset: int | None = self._table.data.persisted_offset(
                TP(self._table.changelog_topic.get_topic_name(), self.partition))
        except Exception:  # a fake table in tests, or faust's API moved: only a log line
            return None
        return offset

    def get(self, key: bytes) -> bytes | None:
        v = self.outbox.get(key, _MISSING)
        if v is not _MISSING:
            return v
        for written in (*reversed(self.sending), *reversed(self.settled)):
            v = written.get(key, _MISSING)
            if v is not _MISSING:
                return v
        v = self._db.get(key)
        return v if v is None or type(v) is bytes else bytes(v)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """States of ``keys``: the unsent, unacknowledged and last settled writes first (newest
        first), the rest from RocksDB in one multi-get - of the keys held only (``_keys``: every
        state in RocksDB, read at open, and every put since): a key not held has no state, or its
        delete is pending, and RocksDB is not asked (most of a batch's keys are new impressions: a
        multi-get of them cost ~0.9 us each)."""
        held = self._keys
        newest_first = [self.outbox, *reversed(self.sending), *reversed(self.settled)]
        out: list[bytes | None]
        ask: list[int]
        if _fast is not None:  # the loop below, compiled (stream.join.fast)
            out, ask = _fast.store_lookup(keys, held, newest_first)
        else:
            out, ask = [None] * len(keys), []
            for i, key in enumerate(keys):
                if key not in held:
                    continue
                for written in newest_first:
                    v = written.get(key, _MISSING)
                    if v is not _MISSING:
                        out[i] = v
                        break
                else:
                    ask.append(i)
        if ask:
            for i, v in zip(ask, self._db.get([keys[i] for i in ask]), strict=True):
                out[i] = v if v is None or type(v) is bytes else bytes(v)
        return out

    def put(self, key: bytes, value: bytes, dues: Dues | None) -> None:
        self.outbox[key] = value
        self._keys.add(key)
        self._index.set(key, dues)

    def put_many(self, items: Iterable[tuple[bytes, bytes, Dues | None]]) -> None:
        """``put`` of each in one loop (a call per state was ~0.1 us per event of the joiner), compiled
        where it is built (``store_put_many``)."""
        if _fast is not None and type(items) is list:
            _fast.store_put_many(items, self.outbox, self._keys, self._index)
            return
        outbox, add, schedule = self.outbox, self._keys.add, self._index.set
        for key, value, dues in items:
            outbox[key] = value
            add(key)
            schedule(key, dues)

    def reschedule(self, key: bytes, dues: Dues | None) -> None:
        if key in self._keys:  # a key not held is never due
            self._index.set(key, dues)

    def delete(self, key: bytes) -> None:
        self.outbox[key] = None
        self._keys.discard(key)
        self._index.set(key, None)

    def drain(self) -> dict[bytes, bytes | None]:
        """The writes since the last drain, to be sent; ``settle()`` them once acknowledged, in the
        order they were drained."""
        out = self.outbox
        if out:
            self.outbox = {}
            self.sending.append(out)
        return out

    def settle(self, written: dict[bytes, bytes | None], offset: int | None = None) -> None:
        """Write drained writes into the local RocksDB, in one batch (a ``WriteBatch`` costs ~3 us
        per record against ~5.5 us for single puts), with ``offset``, the acked changelog offset
        that covers them, as the persisted offset faust's recovery starts after: both land, or
        neither."""
        if not written and offset is None:
            return
        batch = WriteBatch(raw_mode=True)
        for key, value in written.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        if offset is not None:
            batch.put(OFFSET_KEY, str(offset).encode())  # as faust's ``set_persisted_offset`` writes it
        self._db.write(batch)
        for i, sent in enumerate(self.sending):
            if sent is written:
                del self.sending[i]
                break
        if written:
            # drains settle in the order they were drained, so the oldest kept goes first: a key is
            # then found in its newest kept write, or in none (and RocksDB has its newest value)
            self.settled.append(written)
            if len(self.settled) > SETTLED_KEPT:
                del self.settled[0]

    def pop_due(self, lane: int, until_ms: int) -> list[bytes]:
        return self._index.pop_due(lane, until_ms)

    def get_meta(self, name: bytes) -> bytes | None:
        return self.get(META_PREFIX + name)

    def put_meta(self, name: bytes, value: bytes) -> None:
        """Into the outbox (its changelog record goes out with the next flush) and straight into
        the local RocksDB too: metadata is written once its outputs are acknowledged (the swept
        watermarks, ``FunnelJoin.persist_swept``), so a kill -9 restarts from it rather than from
        the one of the flush before (fewer finals emitted twice)."""
        self.outbox[META_PREFIX + name] = value  # not a state: neither counted nor indexed
        self._db[META_PREFIX + name] = value

    def __len__(self) -> int:
        """States held (open and retained funnels), whether due or not."""
        return len(self._keys)
