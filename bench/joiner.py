"""``aitm-stream bench joiner --json FILE``: joiner events/s against a do-nothing faust agent
and a plain aiokafka + rocksdict loop, all on the embedded broker with the same records.

The faust runs are separate processes (``aitm-stream joiner`` itself, and a no-op faust app in
this module); their rate is read from their Prometheus event counters, from the first record
to the last, so that start-up and group joins are not counted. The plain loop runs in this
process: aiokafka consumer -> ``FunnelJoin`` on ``RocksDBStore`` -> aiokafka producer.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.report import write_json
from stream.kafka.broker import EmbeddedBroker, ensure_topics, free_port
from stream.ops.command import command_parser
from stream.ops.settings import Settings, load_settings


def _scrape(port: int, name: str) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))


def _measure_process(cmd: list[str], env: dict[str, str], port: int, metric: str, total: int, timeout_s: float) -> float:
    """Start ``cmd``; events/s between its first and its ``total``-th record (polled)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        first: tuple[float, float] | None = None
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd} did not consume {total} records within {timeout_s}s")
            n = _scrape(port, metric)
            now = time.monotonic()
            if first is None and n > 0:
                first = (now, n)
            if n >= total and first is not None:
                return (n - first[1]) / max(now - first[0], 1e-9)
            time.sleep(0.05)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOINER_", "KAFKA_", "TOPIC_"))}
    env["KAFKA_BOOTSTRAP_SERVERS"] = settings.bootstrap()
    env["JOINER_RECOVERY_CONSISTENCY_CHECK"] = "false"
    env["JOINER_MAX_FUTURE_MS"] = "0"  # simulated event time may run ahead of the wall clock
    env.update(extra)
    return env


def noop_main(argv: list[str]) -> int:
    """The do-nothing faust agent over the five event topics (a benchmark baseline)."""
    import faust
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    port, datadir = int(argv[0]), argv[1]
    settings = load_settings()
    registry = CollectorRegistry()
    events = Counter("aitm_bench_noop_events", "events", registry=registry)
    start_http_server(port, addr="127.0.0.1", registry=registry)
    session_s = settings.kafka_session_timeout_ms / 1000.0
    app = faust.App(  # the joiner's faust settings (stream.join.app.build_app), less its Table
        "aitm-bench-noop", broker=f"kafka://{settings.bootstrap()}", datadir=datadir,
        broker_session_timeout=session_s, broker_heartbeat_interval=max(0.5, session_s / 4),
        broker_request_timeout=max(30.0, session_s * 2), consumer_auto_offset_reset="earliest",
        web_enabled=False, topic_partitions=settings.event_partitions, recovery_consistency_check=False,
        stream_wait_empty=False,
    )
    source = app.topic(*settings.event_topics().values(), key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw")

    @app.agent(source)
    async def noop(stream: Any) -> None:
        async for _ in stream.events():
            events.inc()

    faust.Worker(app, loglevel="error", quiet=True).execute_from_commandline()
    return 0


async def _plain_join(settings: Settings, total: int, datadir: Path) -> float:
    """aiokafka consume -> FunnelJoin on rocksdict -> aiokafka produce; events/s."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from stream.join.app import funnel_config, join_topics
    from stream.join.driver import FunnelJoin, Output
    from stream.join.rocksdb_store import RocksDBStore
    from stream.ops.clock import SystemClock

    cfg = settings.aiokafka_config()
    consumer = AIOKafkaConsumer(
        *settings.event_topics().values(), group_id="aitm-bench-plain", auto_offset_reset="earliest",
        enable_auto_commit=True, session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=1500, **cfg,
    )
    producer = AIOKafkaProducer(linger_ms=5, **cfg)
    await consumer.start()
    await producer.start()
    stores: dict[int, RocksDBStore] = {}
    join = FunnelJoin(
        funnel_config(settings), join_topics(settings),
        lambda p: stores.setdefault(p, RocksDBStore(datadir / f"p{p}")), SystemClock(),
        lateness_ms=settings.joiner_lateness_ms(), sweep_interval_s=settings.joiner_sweep_interval_ms / 1000,
        idle_timeout_s=settings.joiner_idle_timeout_ms / 1000, max_future_ms=0,  # simulated time
    )
    n, t0 = 0, 0.0
    try:
        while n < total:
            batch = await consumer.getmany(timeout_ms=500, max_records=2000)
            if batch and not t0:
                t0 = time.monotonic()
            for tp, msgs in batch.items():
                hw = consumer.highwater(TopicPartition(tp.topic, tp.partition))
                for m in msgs:
                    out: list[Output] = []
                    join.on_record(m.topic, m.partition, m.key, m.value, hw is not None and m.offset + 1 < hw, out, m.offset)
                    if join.sweep_due(m.partition):
                        join.sweep(m.partition, out)
                        wm = join.take_sweep(m.partition)
                        futs = [await producer.send(o.topic, o.value, key=o.key) for o in out]
                        if futs:
                            await asyncio.gather(*futs)
                        if wm is not None:
                            join.persist_swept(m.partition, wm)
                    else:
                        for o in out:
                            await producer.send(o.topic, o.value, key=o.key)
                    n += 1
        await producer.flush()
        return n / (time.monotonic() - t0)
    finally:
        await consumer.stop()
        await producer.stop()
        for s in stores.values():
            s.close()


def main(argv: list[str] | None = None) -> int:
    args_in = list(argv or [])
    if args_in[:1] == ["--noop-worker"]:
        return noop_main(args_in[1:])
    parser = command_parser("bench joiner")
    parser.add_argument("--json", type=Path, required=True, help="write the figures here")
    parser.add_argument("--impressions-per-day", type=int, default=20000)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(args_in)

    from simulators.faults import FaultConfig, SimulatedStream
    from simulators.funnel import FunnelSimulator, SimConfig
    from simulators.kafka_sink import produce

    work = Path(tempfile.mkdtemp(prefix="aitm-bench-joiner-"))
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        settings = load_settings(kafka_bootstrap_servers=broker.bootstrap, data_dir=work / "data")
        ensure_topics(settings.kafka_python_config(), settings.topic_specs())
        sim = FunnelSimulator(SimConfig(seed=args.seed, impressions_per_day=args.impressions_per_day))
        records = list(SimulatedStream(sim, days=args.days, faults=FaultConfig.uniform(0.002)))
        produce(records, settings)
        total = len(records)
        print(f"produced {total} records to {broker.bootstrap}", flush=True)

        port = free_port()
        noop = _measure_process(
            [sys.executable, "-m", "stream.cli", "bench", "joiner", "--noop-worker", str(port), str(work / "noop")],
            _env(settings), port, "aitm_bench_noop_events_total", total, args.timeout,
        )
        print(f"faust no-op agent: {noop:,.0f} events/s", flush=True)
        port = free_port()
        joiner = _measure_process(
            [sys.executable, "-m", "stream.cli", "joiner"],
            _env(settings, METRICS_PORT_JOINER=str(port), DATA_DIR=str(work / "joiner"), JOINER_APP_ID="aitm-bench-joiner"),
            port, "aitm_joiner_events_total", total, args.timeout,
        )
        print(f"faust joiner: {joiner:,.0f} events/s", flush=True)
        plain = asyncio.run(_plain_join(settings, total, work / "plain"))
        print(f"plain aiokafka + rocksdict join: {plain:,.0f} events/s", flush=True)

    result = {
        "joiner_events_per_s": round(joiner, 1),
        "faust_noop_events_per_s": round(noop, 1),
        "plain_join_events_per_s": round(plain, 1),
        "ratio_to_noop": round(joiner / noop, 3),
        "ratio_to_plain": round(joiner / plain, 3),
        "events": total,
        "cpu_count": os.cpu_count(),
    }
    print(write_json(args.json, result), end="")
    return 0
