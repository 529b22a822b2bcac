"""Every process's registry carries the client's process, platform and GC collectors."""

from __future__ import annotations

import os

from stream.ops.metrics import ScorerMetrics, process_registry


def test_process_registry_has_process_platform_and_gc_collectors() -> None:
    registry = process_registry()
    ScorerMetrics(registry)  # beside a process's own metrics, without a name clash
    assert registry.get_sample_value("process_cpu_seconds_total") is not None
    rss = registry.get_sample_value("process_resident_memory_bytes")
    assert rss is not None and rss > 10 * 2**20
    assert registry.get_sample_value("process_open_fds") is not None
    start = registry.get_sample_value("process_start_time_seconds")
    assert start is not None and start > 1e9
    assert registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None
    impl = os.sys.implementation.name  # type: ignore[attr-defined]
    assert any(
        s.labels.get("implementation", "").lower() == impl for f in registry.collect() if f.name == "python_info"
        for s in f.samples
    )


def test_registries_are_independent() -> None:
    """A fresh registry per process (and per test): nothing registers on the global one twice."""
    a, b = process_registry(), process_registry()
    assert a is not b
    assert a.get_sample_value("process_open_fds") is not None and b.get_sample_value("process_open_fds") is not None
