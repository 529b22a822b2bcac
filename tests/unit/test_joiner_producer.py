"""The joiner's producer builds record batches of ``JOINER_PRODUCER_MAX_BATCH_BYTES`` (fewer,
larger batches than aiokafka's 16 KB: less CPU per record, docs/joiner.md round 8)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from stream.join.app import build_app
from stream.ops.settings import load_settings


def test_the_setting_reaches_the_producer_the_joiner_batches_with(tmp_path: Path) -> None:
    settings = load_settings(kafka_bootstrap_servers="127.0.0.1:9", data_dir=tmp_path, joiner_producer_max_batch_bytes=131_072)
    app, _ = build_app(settings, CollectorRegistry())
    assert app.conf.producer_max_batch_size == 131_072
    # what faust hands to aiokafka's producer, whose create_batch() the joiner's BatchSender fills
    assert app.producer._settings_default()["max_batch_size"] == 131_072
    assert app.producer._settings_default()["max_request_size"] >= 131_072


def test_default_and_bounds(tmp_path: Path) -> None:
    assert load_settings(data_dir=tmp_path).joiner_producer_max_batch_bytes == 65_536
    with pytest.raises(ValidationError):  # over faust's max_request_size and Kafka's message.max.bytes
        load_settings(data_dir=tmp_path, joiner_producer_max_batch_bytes=2_000_000)
