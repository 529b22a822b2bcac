"""The joiner bench's I/O floor (``bench.joiner.consume_produce``): what a joiner with a free join
core would still have to do - read every event and write two records for it, the event's bytes
to a samples-like topic and a state-sized record to a changelog-like one on the event's
partition. ``ratio_to_consume_produce`` is only honest if the floor does exactly that."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from bench.joiner import FLOOR_STATE, consume_produce, floor_topics
from simulators.faults import FaultConfig, SimulatedStream, kafka_partition
from simulators.funnel import FunnelSimulator, SimConfig
from simulators.kafka_sink import produce
from stream.kafka.broker import ensure_topics
from stream.ops.settings import Settings
from tests.integration.test_broker_stream import read_all


def test_the_floor_writes_an_output_and_a_state_for_every_event(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    ensure_topics(settings.kafka_python_config(), floor_topics(settings))
    sim = FunnelSimulator(SimConfig(seed=3, impressions_per_day=400))
    records = list(SimulatedStream(sim, days=1, faults=FaultConfig.uniform(0.01)))
    produce(records, settings)

    asyncio.run(consume_produce(settings, len(records)))  # its figures: counted after the first fetch

    samples_topic, states_topic = (spec.name for spec in floor_topics(settings))
    samples = read_all(settings, samples_topic, len(records))
    states = read_all(settings, states_topic, len(records))
    assert Counter((r.key, r.value) for r in samples) == Counter((r.key, r.value) for r in records)
    assert Counter(r.key for r in states) == Counter(r.key for r in records)
    assert all(r.value == FLOOR_STATE for r in states)
    assert all(r.partition == kafka_partition(r.key, settings.event_partitions) for r in states)
