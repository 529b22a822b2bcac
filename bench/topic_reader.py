"""Read whole topics from the beginning without a consumer group (benchmarks, checks, tests).

Tansu's ListOffsets end offsets are wrong (BROKER.md); the fetch high watermark is right, so
"caught up" means every partition's position reached its high watermark from fetch responses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from stream.ops.settings import Settings


class TopicTail:
    """A background reader of some topics from offset 0 that hands every record to ``on_record``."""

    def __init__(
        self, settings: Settings, topics: list[str], on_record: Callable[[ConsumerRecord[Any, Any]], None]
    ) -> None:
        self.settings, self.topics, self.on_record = settings, topics, on_record
        self.count = 0
        self.last_record_at = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="topic-tail", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> TopicTail:
        self._thread.start()
        return self

    def _consumer(self) -> tuple[KafkaConsumer, list[TopicPartition]]:
        consumer = KafkaConsumer(**self.settings.kafka_python_config(), enable_auto_commit=False)
        parts = [
            TopicPartition(t, p) for t in self.topics for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        return consumer, parts

    def _run(self) -> None:
        positions: dict[TopicPartition, int] = {}
        while not self._stop.is_set():
            try:
                consumer, parts = self._consumer()
                for tp in parts:  # after a broker hiccup, carry on where we were
                    if tp in positions:
                        consumer.seek(tp, positions[tp])
                while not self._stop.is_set():
                    for tp, batch in consumer.poll(timeout_ms=200, max_records=5000).items():
                        with self._lock:
                            for rec in batch:
                                self.on_record(rec)
                            self.count += len(batch)
                            self.last_record_at = time.monotonic()
                        positions[tp] = batch[-1].offset + 1
                consumer.close()
            except Exception as exc:
                self.error = exc
                time.sleep(1.0)

    def idle_for(self) -> float:
        return time.monotonic() - self.last_record_at

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def read_topic(
    settings: Settings, topic: str, idle_s: float = 3.0, timeout_s: float = 120.0
) -> list[ConsumerRecord[Any, Any]]:
    """Every record of ``topic`` now, read until ``idle_s`` passes with nothing new."""
    out: list[ConsumerRecord[Any, Any]] = []
    tail = TopicTail(settings, [topic], out.append).start()
    deadline = time.monotonic() + timeout_s
    time.sleep(min(idle_s, 1.0))
    while tail.idle_for() < idle_s and time.monotonic() < deadline:
        time.sleep(0.2)
    tail.stop()
    return out
