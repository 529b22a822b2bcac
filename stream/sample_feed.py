"""The trainer's read side: a background thread that fetches and parses ``samples`` records.

The trainer's torch work releases the GIL; fetching (aiokafka, whose record decoding is in C)
and JSON parsing run meanwhile in this thread, so the two overlap on two cores instead of taking
turns. The thread assigns every partition (no consumer group), seeks to the offsets it is given
(the beginning where none), and hands over ``Chunk`` s of at most ``chunk_size`` records, in
partition order, through a bounded queue (back-pressure: it stops fetching while the trainer is
``max_chunks`` behind). Offsets travel with the chunks: the trainer advances its checkpointed
offsets only once a chunk's samples are trained on (or dead-lettered).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stream.events import InvalidEvent
from stream.samples import Sample, parse_sample

log = logging.getLogger(__name__)


@dataclass
class Invalid:
    """A record that did not parse, for the dead-letter topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    error: InvalidEvent


@dataclass
class Chunk:
    """Parsed records: samples in arrival order, refused records, and per partition the offset
    after the last record in the chunk (what to resume from once the chunk is done)."""

    samples: list[Sample] = field(default_factory=list)
    invalid: list[Invalid] = field(default_factory=list)
    offsets: dict[int, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)  # samples per kind
    fetched_at_s: float = 0.0  # monotonic time the records were fetched

    def __len__(self) -> int:
        return len(self.samples) + len(self.invalid)


class SampleFeed(threading.Thread):
    """Fetch + parse ``topic`` in a thread; ``get`` returns the next ``Chunk`` (or None)."""

    def __init__(
        self,
        client_config: Mapping[str, Any],
        topic: str,
        offsets: Mapping[int, int],
        chunk_size: int,
        max_chunks: int = 8,
        start_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(name="sample-feed", daemon=True)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.client_config = dict(client_config)
        self.topic = topic
        self.start_offsets = dict(offsets)
        self.chunk_size = chunk_size
        self.start_timeout_s = start_timeout_s
        self.chunks: queue.Queue[Chunk] = queue.Queue(maxsize=max_chunks)
        self.highwater: dict[int, int] = {}  # partition -> high watermark of the last fetch response
        self.partitions: list[int] = []
        self.ready = threading.Event()  # set once partitions are assigned and positioned
        self.error: BaseException | None = None
        self._halt = threading.Event()

    # --- the trainer's side ---------------------------------------------------------------------

    def get(self, timeout_s: float) -> Chunk | None:
        """The next chunk, or None after ``timeout_s``; re-raises the thread's failure."""
        try:
            return self.chunks.get(timeout=timeout_s)
        except queue.Empty:
            if self.error is not None:
                raise RuntimeError(f"the samples feed failed: {self.error}") from self.error
            return None

    def lag(self, consumed: Mapping[int, int]) -> int | None:
        """Records behind the high watermark: sum over partitions of high watermark minus
        ``consumed[p]`` (the next offset the caller has not yet finished); None before a fetch."""
        hw = dict(self.highwater)
        if not hw:
            return None
        return sum(max(0, h - consumed.get(p, self.start_offsets.get(p, 0))) for p, h in hw.items())

    def close(self, timeout_s: float = 10.0) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout_s)

    def start_and_wait(self, timeout_s: float | None = None) -> None:
        """Start the thread and wait until the partitions are assigned (raises on failure)."""
        self.start()
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s + 10)
        while not self.ready.wait(0.1):
            if self.error is not None or not self.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the samples feed did not start: {self.error}")

    # --- the thread -----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the trainer by get()
            log.exception("samples feed failed")
            self.error = exc

    async def _main(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            client_id="aitm-trainer",
            max_partition_fetch_bytes=4 << 20,
            fetch_max_bytes=16 << 20,
            **self.client_config,
        )
        await consumer.start()
        try:
            deadline = time.monotonic() + self.start_timeout_s
            parts = consumer.partitions_for_topic(self.topic)
            while not parts and time.monotonic() < deadline and not self._halt.is_set():
                await consumer.topics()  # refreshes the metadata
                parts = consumer.partitions_for_topic(self.topic)
                if not parts:
                    await asyncio.sleep(0.2)
            if not parts:
                raise RuntimeError(
                    f"topic {self.topic!r} has no partitions: create it (aitm-stream broker does)"
                )
            self.partitions = sorted(parts)
            tps = [TopicPartition(self.topic, p) for p in self.partitions]
            consumer.assign(tps)
            for tp in tps:
                if tp.partition in self.start_offsets:
                    consumer.seek(tp, self.start_offsets[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
            self.ready.set()
            checked_at = time.monotonic()
            while not self._halt.is_set():
                polled = await consumer.getmany(timeout_ms=100, max_records=self.chunk_size)
                for tp in tps:
                    hw = consumer.highwater(tp)
                    if hw is not None:
                        self.highwater[tp.partition] = hw
                if time.monotonic() - checked_at >= 1.0:
                    checked_at = time.monotonic()
                    for tp in tps:
                        await rewind_if_truncated(consumer, tp, self.highwater.get(tp.partition))
                if polled:
                    self._put(self._parse(polled))
        finally:
            await consumer.stop()

    def _parse(self, polled: Mapping[Any, list[Any]]) -> Chunk:
        chunk = Chunk(fetched_at_s=time.monotonic())
        samples = chunk.samples
        for tp, records in polled.items():
            if not records:
                continue
            for rec in records:
                try:
                    s = parse_sample(rec.value or b"")
                except InvalidEvent as exc:
                    chunk.invalid.append(
                        Invalid(rec.topic, rec.partition, rec.offset, rec.key, rec.value, exc)
                    )
                    continue
                samples.append(s)
            chunk.offsets[tp.partition] = records[-1].offset + 1
        kinds = chunk.kinds
        for s in samples:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        return chunk

    def _put(self, chunk: Chunk) -> None:
        while not self._halt.is_set():
            try:
                self.chunks.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue


async def rewind_if_truncated(consumer: Any, tp: Any, highwater: int | None) -> bool:
    """If our position is past the partition's high watermark the topic was recreated (a broker
    that lost its data, like the embedded one after a restart): read it again from the start.
    Returns whether it rewound."""
    if highwater is None:
        return False
    position = await consumer.position(tp)
    if position <= highwater:
        return False
    log.warning(
        "%s[%d]: position %d is past the high watermark %d - the topic was recreated; reading it from the start",
        tp.topic, tp.partition, position, highwater,
    )  # fmt: skip
    await consumer.seek_to_beginning(tp)
    return True
