"""``aitm-stream simulate``: stream a simulated funnel (or an Ali-CCP replay) to Kafka or files."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from simulators.delivery import PROFILES
from simulators.faults import FaultConfig, Record, SimulatedStream
from simulators.funnel import EPOCH_MS, FunnelSimulator, SimConfig
from simulators.sinks import Progress, write_files
from stream.ops.command import command_parser
from stream.ops.settings import load_settings


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("simulate")
    p.add_argument("--days", type=int, default=1, help="simulated days of impressions")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulated world")
    p.add_argument("--impressions-per-day", type=int, default=20_000, help="impressions per simulated day")
    p.add_argument("--drift", type=float, default=0.0, help="radians/day of concept drift (e.g. 0.03)")
    p.add_argument("--churn", type=float, nargs="?", const=0.1, default=0.0, metavar="RATE",
                   help="ID churn: this share of user and creative IDs retires each day, replaced by new "
                   "ones (--churn alone: 0.1, so 60 days show ~7x the IDs of one day's population)")
    p.add_argument("--tail-days", type=int, default=0, help="low-rate days after the last one (maturity)")
    p.add_argument("--tail-impressions-per-day", type=int, default=200, help="impressions per tail day")
    p.add_argument("--fault-rate", type=float, default=0.0, help="rate of every fault kind per impression")
    for kind in ("duplicate", "out-of-order", "malformed", "illegal", "late"):
        p.add_argument(f"--{kind}", type=float, default=None, help=f"rate of {kind} faults")
    p.add_argument(
        "--delivery",
        default="realtime",
        choices=PROFILES,
        help="when events reach Kafka: realtime, batch-feeds (hourly approval and daily activation files "
        "per bank) or lagging (a topic hours behind, a stalling partition, bank clocks off)",
    )
    p.add_argument("--out", type=Path, default=None, help="write NDJSON files here instead of Kafka")
    p.add_argument("--speedup", type=float, default=0.0, help="simulated seconds per wall second (0 = max)")
    p.add_argument("--rate", type=float, default=0.0, help="max records per wall second (0 = no limit)")
    p.add_argument("--aliccp", type=Path, default=None, help="replay Ali-CCP files from this directory")
    p.add_argument("--split", default="train", choices=("train", "test"), help="Ali-CCP split")
    p.add_argument(
        "--stop-at-day",
        type=float,
        default=None,
        help="stop once simulated delivery time passes this day (drops the sparse tail of late events)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument(
        "--stay", action="store_true",
        help="once every record is sent, keep running (and serving /metrics) until SIGTERM: a Procfile "
        "supervisor such as honcho stops every process when one exits",
    )  # fmt: skip
    return p


def fault_config(args: argparse.Namespace) -> FaultConfig:
    base = FaultConfig.uniform(args.fault_rate)
    return FaultConfig(
        *(
            getattr(args, name) if getattr(args, name) is not None else default
            for name, default in zip(
                ("duplicate", "out_of_order", "malformed", "illegal", "late"), base.rates(), strict=True
            )
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings()
    topics = settings.event_topics()
    stream: SimulatedStream | None = None
    records: Iterable[Record]
    if args.aliccp is not None:
        from simulators.replay import aliccp_records, read_aliccp

        d = args.aliccp
        rows = read_aliccp(d / f"sample_skeleton_{args.split}.csv", d / f"common_features_{args.split}.csv")
        records = aliccp_records(rows, EPOCH_MS)
    else:
        sim = FunnelSimulator(
            SimConfig(seed=args.seed, impressions_per_day=args.impressions_per_day, drift=args.drift,
                      churn=args.churn)
        )
        stream = SimulatedStream(
            sim,
            args.days,
            fault_config(args),
            tail_days=args.tail_days,
            tail_impressions_per_day=args.tail_impressions_per_day,
            delivery=args.delivery,
            partitions=settings.event_partitions,
        )
        records = stream
    if args.stop_at_day is not None:
        import itertools

        from simulators.funnel import DAY_MS

        end_ms = EPOCH_MS + int(args.stop_at_day * DAY_MS)
        records = itertools.takewhile(lambda r: r.deliver_ms < end_ms, records)
    t0 = time.monotonic()
    if args.out is not None:
        if stream is None:
            args.out.mkdir(parents=True, exist_ok=True)
            from simulators.sinks import record_to_json

            counts: dict[str, int] = {}
            with (args.out / "events.ndjson").open("w") as fh:
                for rec in records:
                    fh.write(json.dumps({**record_to_json(rec, topics[rec.step]), "step": rec.step}) + "\n")
                    counts[topics[rec.step]] = counts.get(topics[rec.step], 0) + 1
        else:
            counts = write_files(stream, args.out, topics)
            write_meta(stream, args, args.out)
        where = str(args.out)
    else:
        from simulators.kafka_sink import produce

        stopping = False

        def stop(*_: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        progress = None if args.quiet else Progress(epoch_ms=EPOCH_MS)
        metrics = None
        if not args.no_metrics:
            from prometheus_client import start_http_server

            from stream.ops.metrics import SimulatorMetrics, process_registry

            registry = process_registry()
            metrics = SimulatorMetrics(registry)
            start_http_server(settings.metrics_port_simulator, addr=settings.metrics_host, registry=registry)
        from kafka.errors import KafkaError

        try:
            counts = produce(
                records, settings, speedup=args.speedup, max_rate=args.rate, progress=progress,
                should_stop=lambda: stopping, metrics=metrics,
            )  # fmt: skip
        except KafkaError as exc:
            print(f"error: cannot produce to Kafka at {settings.bootstrap()}: {exc}", file=sys.stderr)
            return 69  # EX_UNAVAILABLE, as for every command (stream/cli.py)
        where = settings.bootstrap()
    elapsed = time.monotonic() - t0
    total = sum(counts.values())
    print(f"sent {total} records to {where} in {elapsed:.1f}s ({total / max(elapsed, 1e-9):,.0f}/s)")
    for topic, n in sorted(counts.items()):
        print(f"  {topic:<14} {n:>10}")
    if args.stay and args.out is None:
        print("done; staying up until stopped (--stay)", flush=True)
        while not stopping:
            time.sleep(0.2)
    return 0


def write_meta(stream: SimulatedStream, args: argparse.Namespace, out: Path) -> None:
    """meta.json: the configuration, counts of faults and the oracle AUC per task."""
    import numpy as np

    from aitm.evaluate import auc
    from simulators.funnel import TASKS

    rows = [t for t in stream.truth if not t.tail]
    p = np.array([t.p_true for t in rows])
    y = np.array([t.labels for t in rows])
    faults: dict[str, int] = {}
    for f in stream.faults:
        faults[f.kind] = faults.get(f.kind, 0) + 1
    dead: dict[str, int] = {}
    for d in stream.dead_letters:
        dead[d.reason] = dead.get(d.reason, 0) + 1
    meta = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "impressions": len(rows),
        "positive_rate": dict(zip(TASKS, y.mean(axis=0).tolist(), strict=True)),
        "oracle_auc": {t: auc(y[:, i], p[:, i]) for i, t in enumerate(TASKS)},
        "faults": faults,
        "delivery": stream.delivery.name,
        "expected_dead_letters": dead,
        "finals_expected": sum(1 for t in stream.truth if t.final_required),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
