"""Records through the joiner's core in process, at the pace of their delivery: one ``FunnelJoin`` on
in-memory stores, the clock following each record's delivery time (sweeps every
``JOINER_SWEEP_INTERVAL_MS``, topics idle after ``JOINER_IDLE_TIMEOUT_MS``), then two quiet
minutes so every topic goes idle and every due final is emitted. ``bench chaos`` (its real-time
final delays) and ``bench churn`` (its samples) both join this way."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from simulators.faults import kafka_partition
from stream.contract.events import STEPS
from stream.join.app import funnel_config, join_topics
from stream.join.driver import FunnelJoin, Output
from stream.join.store import InMemoryStore
from stream.ops.clock import FakeClock
from stream.ops.settings import Settings


def join_at_delivery_pace(records: Sequence[Any], settings: Settings, collect: Callable[[list[Output]], None]) -> None:
    """Join ``records`` (``simulators.faults.Record``: step, key, value, deliver_ms; in delivery
    order) and hand every batch of outputs to ``collect``."""
    topics = join_topics(settings)
    by_step = dict(zip(STEPS, topics.events, strict=True))
    stores: dict[int, InMemoryStore] = {}
    clock = FakeClock(records[0].deliver_ms if records else 0)
    join = FunnelJoin(
        funnel_config(settings), topics, lambda p: stores.setdefault(p, InMemoryStore()), clock,
        lateness_ms=settings.joiner_lateness_ms(), sweep_interval_s=settings.joiner_sweep_interval_ms / 1000,
        idle_timeout_s=settings.joiner_idle_timeout_ms / 1000, max_future_ms=0,
    )  # fmt: skip
    parts = settings.event_partitions
    for p in range(parts):
        for k in range(len(STEPS)):
            join.caught_up(p, k)  # read as delivered: every topic at its end (records say so too)

    def tick(partitions: Iterable[int]) -> None:
        for p in partitions:
            if join.sweep_due(p):
                out: list[Output] = []
                join.sweep(p, out)
                wm = join.take_sweep(p)
                collect(out)
                if wm is not None:
                    join.persist_swept(p, wm)

    every = range(parts)
    last_all = clock.now_ms()
    for rec in records:
        if rec.deliver_ms > clock.now_ms():
            clock.advance(rec.deliver_ms - clock.now_ms())
        out: list[Output] = []
        p = kafka_partition(rec.key, parts)
        join.on_record(by_step[rec.step], p, rec.key, rec.value, False, out)
        collect(out)
        if clock.now_ms() - last_all >= 10_000:  # quiet partitions too (their topics go idle)
            last_all = clock.now_ms()
            tick(every)
        else:
            tick((p,))
    for _ in range(120):  # the stream has ended: two minutes, every topic goes idle
        clock.advance(1000)
        tick(every)
