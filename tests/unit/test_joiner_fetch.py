"""The joiner's consumer waits at most ``JOINER_FETCH_MAX_WAIT_MS`` at the broker per fetch, not
faust's hard-coded 1500 ms: aiokafka keeps one fetch in flight per broker, so a long poll on
caught-up partitions stalls the reading of a backlog on the others (docs/joiner.md, round 15)."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from stream.join.app import build_app
from stream.ops.settings import load_settings


def _fetch_max_wait_ms(tmp_path: Path, **overrides: int) -> int:
    """The fetch wait of the aiokafka consumer the joiner's faust consumer thread makes (and would
    start; nothing connects here)."""

    async def make() -> int:
        settings = load_settings(kafka_bootstrap_servers="127.0.0.1:9", data_dir=tmp_path, **overrides)
        app, _ = build_app(settings, CollectorRegistry())
        thread = app.consumer._thread
        assert isinstance(thread, AIOKafkaConsumerThread)
        client = thread._create_worker_consumer(app.transport)
        assert isinstance(client, AIOKafkaConsumer)
        await client.stop()
        return int(client._fetch_max_wait_ms)

    return asyncio.run(make())


def test_the_setting_reaches_the_consumer_the_joiner_fetches_with(tmp_path: Path) -> None:
    assert _fetch_max_wait_ms(tmp_path, joiner_fetch_max_wait_ms=77) == 77
    # aiokafka hands it to the fetcher its start() makes, which puts it in every FetchRequest
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer.start)


def test_the_default_is_shorter_than_fausts(tmp_path: Path) -> None:
    assert load_settings(data_dir=tmp_path).joiner_fetch_max_wait_ms == 100
    assert _fetch_max_wait_ms(tmp_path) == 100
    # faust's own value, overridden above: if faust stops hard-coding it, re-check the override
    assert "fetch_max_wait_ms=1500" in inspect.getsource(AIOKafkaConsumerThread._create_worker_consumer)


def test_bounds(tmp_path: Path) -> None:
    for bad in (0, 60_000):
        with pytest.raises(ValidationError):
            load_settings(data_dir=tmp_path, joiner_fetch_max_wait_ms=bad)
