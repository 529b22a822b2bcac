"""``aitm-stream demo``: the embedded broker plus simulated traffic, ending with counts per topic.

(The full pipeline - joiner, trainer, scorer, Prometheus - joins the demo as it is built.)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from simulators.faults import FaultConfig, SimulatedStream
from simulators.funnel import EPOCH_MS, FunnelSimulator, SimConfig
from simulators.kafka_sink import produce
from simulators.sinks import Progress
from stream.broker import EmbeddedBroker, ensure_topics
from stream.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aitm-stream demo", description=__doc__)
    p.add_argument("--days", type=int, default=2)
    p.add_argument("--impressions-per-day", type=int, default=20_000)
    p.add_argument("--fault-rate", type=float, default=0.005)
    p.add_argument("--speedup", type=float, default=0.0, help="simulated s per wall s (0 = max)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = load_settings()
    broker = None
    if settings.kafka_bootstrap_servers is None:
        broker = EmbeddedBroker().start()
        settings = load_settings(kafka_bootstrap_servers=broker.bootstrap)
        print(f"embedded broker (Tansu) on {broker.bootstrap}")
    try:
        ensure_topics(settings.kafka_python_config(), settings.topic_specs())
        sim = FunnelSimulator(SimConfig(impressions_per_day=args.impressions_per_day))
        stream = SimulatedStream(sim, args.days, FaultConfig.uniform(args.fault_rate))
        t0 = time.monotonic()
        counts = produce(stream, settings, speedup=args.speedup, progress=Progress(epoch_ms=EPOCH_MS))
        elapsed = time.monotonic() - t0
        total = sum(counts.values())
        print(f"\n{total} records in {elapsed:.1f}s ({total / elapsed:,.0f}/s)\n")
        print(f"{'topic':<16}{'records':>10}")
        for topic in settings.event_topics().values():
            print(f"{topic:<16}{counts.get(topic, 0):>10}")
        faults: dict[str, int] = {}
        for f in stream.faults:
            faults[f.kind] = faults.get(f.kind, 0) + 1
        print("\nfaults injected: " + ", ".join(f"{k}={v}" for k, v in sorted(faults.items())))
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
