"""The trainer's read side: a child process that fetches and parses ``samples`` records.

Parsing samples (JSON above all) is Python work that holds the GIL, about half as costly per sample as the training
step itself; in a thread it stalled the trainer's torch calls (each waits for the GIL on its way
back), so the feed runs in a process of its own, on the other core. It assigns every partition
(no consumer group), seeks to the offsets it is given (the beginning where none), and hands over
``Chunk`` s of at most ``chunk_size`` records through a bounded queue, the partitions merged by
stream time (``stream.learn.partition_merge``: a backlog comes in the joiner's watermark order,
not one partition's fetch after another; a caught-up partition holds nothing back)
(back-pressure: it stops fetching while the trainer is ``max_chunks`` behind). A chunk carries
its samples as columns (``SampleBatch``), which cross the pipe for about a microsecond per
sample. Offsets travel with the chunks: the trainer advances its checkpointed offsets only once a
chunk's samples are trained on (or dead-lettered). The child exits when told to, when the queue
is closed, and when its parent dies (a ``kill -9`` of the trainer leaves no orphan consumer); it
ignores SIGTERM and SIGINT, which a process manager sends to the whole group: the trainer stops
it once its last batch is trained.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np

from stream.contract.samples import SampleRecord, decode_records
from stream.kafka import offsets
from stream.learn.partition_merge import Merged, PartitionMerge
from stream.learn.sample_batch import SampleBatch

log = logging.getLogger(__name__)
PIPE_BYTES = 1 << 20  # the feed queue's pipe: about a dozen chunks of 500 samples
# a partition's lane in the merge holds this many chunks of parsed records before it is no longer
# fetched (stream/learn/partition_merge.py)
MERGE_LANE_CHUNKS = 4
# a partition behind its high watermark that sends nothing this long no longer holds the others
# back (a fetch that keeps failing must not stop the trainer; the order is then not merged)
MERGE_WAIT_S = 5.0
ClientConfig = Mapping[str, Any] | Callable[[], Mapping[str, Any]]  # picklable: it goes to the child


@dataclass
class Invalid:
    """A record that did not parse, for the dead-letter topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
    detail: str


@dataclass
class Chunk:
    """Parsed records: samples in arrival order (as columns), refused records, and per partition
    the offset after the last record in the chunk (what to resume from once the chunk is done)."""

    samples: SampleBatch = field(default_factory=SampleBatch.empty)
    invalid: list[Invalid] = field(default_factory=list)
    offsets: dict[int, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)  # samples per kind
    fetched_at_s: float = 0.0  # monotonic time the records were fetched (system-wide clock)
    highwater: dict[int, int] = field(default_factory=dict)  # partition -> high watermark at the fetch
    # (S, 3) int64: the samples' (stream time, partition, offset), their place in the order of all
    # partitions merged (stream.learn.partition_merge); several ranks cut their rounds on it
    keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))

    def __len__(self) -> int:
        return len(self.samples) + len(self.invalid)


def parse_chunk(polled: Mapping[Any, list[Any]], fetched_at_s: float = 0.0) -> Chunk:
    """Parse fetched records (per topic partition, in order; either sample encoding, mixed as they
    come) into a ``Chunk``."""
    chunk = Chunk(fetched_at_s=fetched_at_s)
    valid: list[SampleRecord] = []
    for tp, records in polled.items():
        if not records:
            continue
        good, bad = decode_records(list(map(_value, records)))
        valid += good
        for i, exc in bad:
            rec = records[i]
            chunk.invalid.append(
                Invalid(rec.topic, rec.partition, rec.offset, rec.key, rec.value, exc.reason, exc.message)
            )
        chunk.offsets[tp.partition] = records[-1].offset + 1
    chunk.samples = SampleBatch.from_records(valid)
    chunk.kinds = chunk.samples.kind_counts()
    return chunk


_value = attrgetter("value")


def _chunk(merged: Merged, fetched_at_s: float, highwater: Mapping[int, int]) -> Chunk:
    """What the merge handed over, as the chunk the trainer takes."""
    invalid = [Invalid(r.record.topic, r.record.partition, r.record.offset, r.record.key, r.record.value, r.reason,
                       r.detail) for r in merged.refused]
    return Chunk(merged.samples, invalid, merged.offsets, merged.samples.kind_counts(), fetched_at_s, dict(highwater),
                 merged.keys)


class SampleFeed:
    """Fetch + parse ``topic`` in a child process; ``get`` returns the next ``Chunk`` (or None)."""

    def __init__(
        self,
        client_config: ClientConfig,
        topic: str,
        offsets: Mapping[int, int],
        chunk_size: int,
        max_chunks: int = 8,
        start_timeout_s: float = 30.0,
        share: tuple[int, int] = (0, 1),
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.client_config = client_config
        self.topic = topic
        self.start_offsets = dict(offsets)
        self.chunk_size = chunk_size
        self.max_chunks = max_chunks
        self.start_timeout_s = start_timeout_s
        # (rank, ranks): this feed reads the partitions p with p % ranks == rank (several trainer
        # ranks split the topic so; stream/learn/ranks.py)
        self.share = share
        self.ready = False
        self.highwater: dict[int, int] = {}  # partition -> high watermark of the last fetch response
        self.partitions: list[int] = []
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process with torch threads
        self._queue: Any = None
        self._halt: Any = None
        self._proc: Any = None

    # --- the trainer's side ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The feed process's pid while it runs."""
        return self._proc.pid if self._proc is not None else None

    def _receive(self, timeout_s: float) -> Chunk | None:
        """One message from the child: a chunk, or None (high watermarks only, or nothing)."""
        try:
            kind, body = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            if self._proc is not None and not self._proc.is_alive():
                raise RuntimeError(f"the samples feed exited with code {self._proc.exitcode}") from None
            return None
        if kind == "error":
            raise RuntimeError(f"the samples feed failed: {body}")
        if kind == "ready":
            self.partitions = list(body)
            self.ready = True
            return None
        self.highwater.update(body.highwater)
        return body if kind == "chunk" else None

    def get(self, timeout_s: float) -> Chunk | None:
        """The next chunk, or None after ``timeout_s``; raises if the child failed."""
        deadline = time.monotonic() + timeout_s
        while True:
            chunk = self._receive(max(0.0, deadline - time.monotonic()))
            if chunk is not None or time.monotonic() >= deadline:
                return chunk

    def lag(self, consumed: Mapping[int, int]) -> int | None:
        """Records behind the high watermark: sum over partitions of high watermark minus
        ``consumed[p]`` (the next offset the caller has not yet finished); None before a fetch."""
        return offsets.lag(dict(self.highwater), consumed, self.start_offsets)

    def close(self, timeout_s: float = 10.0) -> None:
        if self._proc is None:
            return
        self._halt.set()
        self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.kill()  # it ignores SIGTERM
            self._proc.join(5)
        self._queue.close()
        self._queue.cancel_join_thread()
        self._proc = None

    def start_and_wait(self, timeout_s: float | None = None) -> None:
        """Start the child and wait until the partitions are assigned (raises on failure)."""
        self._queue = self._ctx.Queue(maxsize=self.max_chunks)
        _widen_pipe(self._queue)
        self._halt = self._ctx.Event()
        self._proc = self._ctx.Process(
            target=_child_main,
            args=(self.client_config, self.topic, self.start_offsets, self.chunk_size, self.start_timeout_s,
                  self._queue, self._halt, os.getpid(), self.share),
            name="aitm-sample-feed",
            daemon=True,
        )
        self._proc.start()
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s + 10)
        while not self.ready:
            if time.monotonic() > deadline:
                self.close(1)
                raise RuntimeError("the samples feed did not start in time")
            if self._receive(0.1) is not None:
                raise RuntimeError("the samples feed sent records before it was ready")


def _widen_pipe(q: Any, size: int = PIPE_BYTES) -> None:
    """Let the queue's pipe hold several chunks (Linux's default 64 KiB holds less than one):
    the child's queue thread then writes a whole chunk at once, and ``get`` never waits for that
    thread to win its process's GIL back from the parser to finish a chunk half in the pipe."""
    try:
        import fcntl

        fcntl.fcntl(q._reader.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (ImportError, AttributeError, OSError) as exc:  # not Linux, or over pipe-max-size
        log.debug("pipe size left as it is: %s", exc)


# --- the child ----------------------------------------------------------------------------------


def _child_main(client_config: ClientConfig, topic: str, offsets: Mapping[int, int], chunk_size: int,
                start_timeout_s: float, out: Any, halt: Any, parent_pid: int,
                share: tuple[int, int] = (0, 1)) -> None:
    # the trainer decides when the feed stops (``close``): a SIGTERM or Ctrl-C sent to the whole
    # process group must not kill the feed under a trainer that is still finishing its batch
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s sample-feed %(levelname)s %(message)s")
    out.cancel_join_thread()  # exiting never waits for the parent to drain the queue
    sys.setswitchinterval(0.0005)  # the queue thread gets the GIL from the parser within 0.5 ms
    child = FetchLoop(client_config, topic, offsets, chunk_size, start_timeout_s, out, halt, parent_pid, share)
    try:
        asyncio.run(child.run())
    except BaseException as exc:  # reported to the trainer by get()
        log.exception("samples feed failed")
        child.put("error", f"{type(exc).__name__}: {exc}")


@dataclass
class FetchLoop:
    """The feed process's loop: fetch ``samples`` records, parse them into chunks and queue them
    to the trainer, until the trainer says stop or goes away."""

    client_config: ClientConfig
    topic: str
    offsets: Mapping[int, int]
    chunk_size: int
    start_timeout_s: float
    out: Any  # the queue to the trainer
    halt: Any  # the trainer's stop event
    parent_pid: int
    share: tuple[int, int] = (0, 1)  # (rank, ranks): read the partitions p % ranks == rank

    def stopping(self) -> bool:
        return bool(self.halt.is_set()) or os.getppid() != self.parent_pid

    def put(self, kind: str, body: Any) -> bool:
        """Queue a message; blocks while the queue is full (back-pressure). False once stopping."""
        while not self.stopping():
            try:
                self.out.put((kind, body), timeout=0.1)
                return True
            except queue.Full:
                continue
            except (ValueError, OSError):  # the queue is closed
                return False
        return False

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        config = self.client_config() if callable(self.client_config) else self.client_config
        consumer = AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            client_id="aitm-trainer",
            max_partition_fetch_bytes=4 << 20,
            fetch_max_bytes=16 << 20,
            **config,
        )
        await consumer.start()
        try:
            deadline = time.monotonic() + self.start_timeout_s
            parts = consumer.partitions_for_topic(self.topic)
            while not parts and time.monotonic() < deadline and not self.stopping():
                await consumer.topics()  # refreshes the metadata
                parts = consumer.partitions_for_topic(self.topic)
                if not parts:
                    await asyncio.sleep(0.2)
            if not parts:
                raise RuntimeError(
                    f"topic {self.topic!r} has no partitions: create it (aitm-stream broker does)"
                )
            rank, ranks = self.share
            parts = {p for p in parts if p % ranks == rank}  # a rank may own none (more ranks than partitions)
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            for tp in tps:
                if tp.partition in self.offsets:
                    consumer.seek(tp, self.offsets[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
            self.put("ready", sorted(parts))
            while not tps and not self.stopping():  # nothing of ours to read: wait to be stopped
                await asyncio.sleep(0.1)
            checked_at = last_out = time.monotonic()
            guard = offsets.RecreatedGuard()
            highwater: dict[int, int] = {}
            merge = PartitionMerge(parts, MERGE_LANE_CHUNKS * self.chunk_size)
            handed = False  # the last round handed records over: more may be ready, do not wait
            while not self.stopping():
                wanted = [tp for tp in tps if merge.room(tp.partition) > 0]
                polled = (await consumer.getmany(*wanted, timeout_ms=0 if handed else 100,
                                                 max_records=self.chunk_size) if wanted else {})
                for tp, records in polled.items():
                    merge.add(tp.partition, records)
                changed = False
                for tp in tps:
                    hw = consumer.highwater(tp)
                    if hw is not None and highwater.get(tp.partition) != hw:
                        highwater[tp.partition] = hw
                        changed = True
                if time.monotonic() - checked_at >= 1.0:
                    checked_at = time.monotonic()
                    for tp in await offsets.rewind_async(consumer, tps, {tp: highwater.get(tp.partition) for tp in tps},
                                                         guard):
                        merge.forget(tp.partition)
                waiting = [tp.partition for tp in tps
                           if tp.partition not in highwater or await consumer.position(tp) < highwater[tp.partition]]
                merged = merge.take(self.chunk_size, waiting)
                if merged is None and merge.buffered() and time.monotonic() - last_out >= MERGE_WAIT_S:
                    log.warning("partitions %s sent nothing for %.0f s although behind: handing over without them",
                                waiting, MERGE_WAIT_S)
                    merged = merge.take(self.chunk_size, ())
                handed = merged is not None
                if merged is not None:
                    last_out = time.monotonic()
                    self.put("chunk", _chunk(merged, last_out, highwater))
                elif not merge.buffered():
                    last_out = time.monotonic()
                    if changed:
                        self.put("highwater", Chunk(highwater=dict(highwater)))
        finally:
            await consumer.stop()
