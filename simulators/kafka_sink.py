"""Kafka sink: send simulated records to the event topics, paced in simulated time."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable

from simulators.faults import Record
from simulators.sinks import Progress
from stream.ops.metrics import SimulatorMetrics
from stream.ops.settings import Settings


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
    short."""
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
            producer.send(topic, key=rec.key, value=rec.value, timestamp_ms=rec.timestamp_ms)
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
    return dict(counts)
