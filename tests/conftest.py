"""Shared fixtures: a real embedded broker (Tansu) on loopback, per-test topic names, clocks."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stream.kafka.broker import EmbeddedBroker, ensure_topics
from stream.ops.clock import FakeClock
from stream.ops.settings import Settings

_ids = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One Tansu broker for the whole session; a test that needs it fails if it cannot start."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    b = EmbeddedBroker(log_path=log)
    try:
        b.start()
    except Exception as exc:  # fail loudly, never skip
        pytest.fail(f"the embedded broker could not start: {exc} (log: {log})")
    yield b
    b.stop()


@pytest.fixture
def make_settings(broker: EmbeddedBroker, tmp_path: Path) -> Callable[..., Settings]:
    """Settings on the session broker with topic names unique to this test (topics created)."""

    def make(**overrides: object) -> Settings:
        n = next(_ids)
        names = {
            f: f"t{n}-{default}"
            for f, default in (
                ("topic_impressions", "impressions"),
                ("topic_clicks", "clicks"),
                ("topic_applications", "applications"),
                ("topic_approvals", "approvals"),
                ("topic_activations", "activations"),
                ("topic_samples", "samples"),
                ("topic_dead_letters", "dead-letters"),
                ("topic_scores", "scores"),
                ("topic_model_versions", "model-versions"),
            )
        }
        values: dict[str, object] = {
            "kafka_bootstrap_servers": broker.bootstrap,
            "data_dir": tmp_path / f"data{n}",
            **names,
            **overrides,
        }
        settings = Settings(**values)  # type: ignore[arg-type]
        ensure_topics(settings.kafka_python_config(), settings.topic_specs())
        return settings

    return make


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start_ms=1_767_225_600_000)
