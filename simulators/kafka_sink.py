"""Kafka sink: send simulated records to the event topics, paced in simulated time."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from simulators.faults import Record
from simulators.sinks import Progress
from stream.ops.metrics import SimulatorMetrics
from stream.ops.settings import Settings


class NotDelivered(RuntimeError):
    """Records the broker did not acknowledge (after the producer's retries): a run that lost
    part of its input cannot be judged against its answer key, so it says so."""

    def __init__(self, failed: list[tuple[str, bytes | None, str]], counts: dict[str, int]) -> None:
        self.failed, self.counts = failed, counts
        first = "; ".join(f"{t} {k!r}: {e}" for t, k, e in failed[:3])
        super().__init__(
            f"{len(failed)} of {sum(counts.values())} records were not delivered (first: {first})"
        )


def produce(
    records: Iterable[Record],
    settings: Settings,
    speedup: float = 0.0,
    max_rate: float = 0.0,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    metrics: SimulatorMetrics | None = None,
    max_idle_s: float = 1.0,
) -> dict[str, int]:
    """Send records to Kafka in delivery order, paced by ``speedup`` (simulated s per wall s)
    and/or ``max_rate`` (records per wall second); 0 means as fast as possible. Stretches with
    no record for over ``max_idle_s`` wall seconds (the sparse tail of late activations) are cut
    short. Raises ``NotDelivered`` once all is sent if the broker refused any record.
    """
    from kafka import KafkaProducer

    topics = settings.event_topics()
    client_config = settings.kafka_python_config()
    producer = KafkaProducer(
        client_id="aitm-simulator",
        acks="all",
        # at-least-once with dedupe by event id downstream: kafka-python's idempotent producer
        # dies for good when a broker forgets its producer id (a restart of the embedded one)
        enable_idempotence=False,
        linger_ms=5,
        batch_size=256 * 1024,
        retries=10,
        **client_config,
    )
    counts: Counter[str] = Counter()
    failed: list[tuple[str, bytes | None, str]] = []
    sent, t0, sim0 = 0, time.monotonic(), None
    try:
        for rec in records:
            if should_stop():
                break
            if sim0 is None:
                sim0 = rec.deliver_ms
            due = 0.0
            if speedup > 0:
                due = (rec.deliver_ms - sim0) / 1000.0 / speedup
            if max_rate > 0:
                due = max(due, sent / max_rate)
            wait = t0 + due - time.monotonic()
            if wait > max_idle_s:  # an empty stretch of simulated time: skip it
                t0 -= wait - max_idle_s
                wait = max_idle_s
            if wait > 0:
                producer.flush()
                time.sleep(wait)
            topic = topics[rec.step]
            future = producer.send(topic, key=rec.key, value=rec.value, timestamp_ms=rec.timestamp_ms)
            future.add_errback(lambda exc, t=topic, k=rec.key: failed.append((t, k, repr(exc))))
            counts[topic] += 1
            sent += 1
            if metrics is not None:
                metrics.records.labels(topic=topic).inc()
                metrics.sim_time.set(rec.deliver_ms / 1000.0)
            if progress is not None and sent % 256 == 0:
                progress.update(sent, rec.deliver_ms, counts)
        producer.flush()
        if progress is not None and sim0 is not None:
            progress.update(sent, rec.deliver_ms, counts, force=True)
            progress.out.write("\n")
    finally:
        producer.close()
    if failed:
        raise NotDelivered(failed, dict(counts))
    return dict(counts)


class Background(threading.Thread):
    """``fn(*args, **kwargs)`` in a thread whose ``result()`` joins it and returns its value or
    raises its exception (``produce`` in the background: a producer that could not deliver fails the run
    that started it)."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args_, self.kwargs_ = fn, args, kwargs
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args_, **self.kwargs_)
        except BaseException as exc:  # handed to result()
            self.error = exc

    def result(self) -> Any:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value
