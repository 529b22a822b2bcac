"""``aitm-stream bench joiner --json FILE``: joiner events/s against an aiokafka consume-only loop
(``ratio_to_consume``: the broker's and client's own limit), a do-nothing faust agent and a plain
aiokafka + rocksdict loop, all on the embedded broker with the same records, plus the joiner
process's CPU time per event (``cpu_us_per_event``), and against the I/O floor of any joiner - an
aiokafka loop that consumes the events and writes two records per event with no join
(``consume_produce_events_per_s``, ``ratio_to_consume_produce``, ``consume_produce_cpu_us_per_event``;
docs/joiner.md, round 12). The joiner runs twice, in a random order: as shipped, and with its
compiled common path off (``python_core_events_per_s``, ``python_core_cpu_us_per_event``,
``cpu_ratio_to_python_core``: docs/joiner.md, round 14).

The faust runs are separate processes (``aitm-stream joiner`` itself, and a no-op faust app in
this module); their rate is read from their Prometheus event counters, from the first record
to the last, so that start-up and group joins are not counted. The plain loop runs in this
process: aiokafka consumer -> ``FunnelJoin`` on ``RocksDBStore`` -> aiokafka producer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
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
from stream.ops.settings import Settings, TopicSpec, load_settings


def _scrape(port: int, *names: str) -> list[float]:
    """The values of metrics ``names`` (each its samples summed; 0 when absent or not answered). Only
    those are asked for (``?name[]=``, prometheus_client's filter): the whole joiner registry,
    polled every 50 ms, cost the joiner ~8% of its CPU in its profile (issue 16), which the
    no-op's tiny registry did not - a bench artifact, not the joiner's cost."""
    query = "&".join(f"name[]={name}" for name in names)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics?{query}", timeout=2).read().decode()
    except OSError:
        return [0.0] * len(names)
    lines = text.splitlines()
    return [sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((name + "{", name + " ")))
            for name in names]  # fmt: skip


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def next_poll_s(remaining: float, rate: float | None, fine_s: float = 0.05, coarse_s: float = 0.5) -> float:
    """How long to wait before the next poll of a worker's event counter: ``fine_s`` until a rate
    is known and near the end, else a quarter of the time the rest would take at ``rate`` (at most
    ``coarse_s``). Each poll is a ``/metrics`` request served inside the measured process and
    charged to its CPU (20 polls a second cost the joiner several us per event: issue 16, round 9),
    so it is polled sparsely; ``rate`` is the fastest seen between two polls, so the wait ends
    before the last record unless the worker speeds up more than fourfold - the end is timed to
    ``fine_s``, as when polled every ``fine_s``.

    >>> next_poll_s(40_000, None), next_poll_s(40_000, 10_000.0), next_poll_s(8_000, 10_000.0), next_poll_s(1_000, 10_000.0)
    (0.05, 0.5, 0.2, 0.05)
    """
    if rate is None or rate <= 0:
        return fine_s
    return min(coarse_s, max(fine_s, 0.25 * remaining / rate))


def _measure_process(
    cmd: list[str], env: dict[str, str], port: int, metric: str, total: int, timeout_s: float, stamp: str | None = None
) -> tuple[float, float, int, float, float]:
    """Start ``cmd``; (events/s, CPU microseconds per event, polls, end window, events/s as polled)
    between its first and its ``total``-th record, polled (``next_poll_s``: every 50 ms until the
    first record is counted and near the end, sparsely in between); the end window is the time
    between the last two polls (the last record came within it).

    With ``stamp`` - a gauge the process sets to the time it last finished handling records, right
    after counting them (the joiner's ``aitm_joiner_last_event_timestamp_seconds``) - the events/s
    are timed by it: from the stamp read with the first count to the stamp read with the last, the
    process's own times of those counts, as the consume-only loop times itself. Timed by the polls
    instead (the last figure, kept for comparison), the end is late by up to a poll interval:
    ~5% of the joiner's half-second window on the bench's default records (docs/joiner.md, round 21)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    names = (metric, stamp) if stamp else (metric,)
    try:
        deadline = time.monotonic() + timeout_s
        first: tuple[float, float, float, float] | None = None
        polls = 0
        rate: float | None = None
        last: tuple[float, float] | None = None
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd} did not consume {total} records within {timeout_s}s")
            values = _scrape(port, *names)
            n, stamped = values[0], (values[1] if stamp else 0.0)
            now = time.monotonic()
            if first is not None:
                polls += 1
            if first is None and n > 0:
                first = (now, n, _cpu_s(proc.pid), stamped)
            elif last is not None and now > last[0]:
                rate = max(rate or 0.0, (n - last[1]) / (now - last[0]))  # the fastest seen
            if n >= total and first is not None:
                events = max(n - first[1], 1.0)
                # the last record came between the poll before and this one: how closely the end is timed
                window = now - last[0] if last is not None else 0.0
                cpu = (_cpu_s(proc.pid) - first[2]) * 1e6 / events
                polled = events / max(now - first[0], 1e-9)
                timed = events / (stamped - first[3]) if stamp and stamped > first[3] > 0 else polled
                return timed, cpu, polls, window, polled
            last = (now, n)
            time.sleep(next_poll_s(total - n, rate))
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


def _event_consumer(settings: Settings, group_id: str) -> Any:
    """An aiokafka consumer of the five event topics from their start, as every loop here reads them
    with aiokafka's own settings (its fetch wait is 500 ms; the joiner's, 100 ms, is not lent to
    the loops the joiner is compared with)."""
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(
        *settings.event_topics().values(), group_id=group_id, auto_offset_reset="earliest",
        enable_auto_commit=True, session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=1500, **settings.aiokafka_config(),
    )


async def _consume_only(settings: Settings, total: int) -> tuple[float, int]:
    """An aiokafka consume-only loop over the event topics (the broker's and the client's share of
    the cost, nothing else): (events/s after its first fetched batch to its ``total``-th record,
    the size of that first batch)."""
    consumer = _event_consumer(settings, "aitm-bench-consume")
    await consumer.start()
    n, t0, nbytes, n0 = 0, 0.0, 0, 0
    try:
        while n < total:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                n += len(msgs)
                nbytes += sum(len(m.value or b"") for m in msgs)  # touch every record, as a reader does
            if batch and not t0:
                # the clock starts once the first records are in hand, so those are not counted:
                # their fetch began before it (the joiner's rate is counted the same way)
                t0, n0 = time.monotonic(), n
        return (n - n0) / (time.monotonic() - t0), n0
    finally:
        await consumer.stop()


FLOOR_STATE = bytes(389)  # a funnel state's size in the changelog (docs/joiner.md, round 10)


def floor_topics(settings: Settings) -> list[TopicSpec]:
    """The topics the I/O floor writes: samples-like (as many partitions as ``samples``) and
    changelog-like (as many as the event topics, a state on its event's partition)."""
    return [
        TopicSpec(name=f"{settings.topic_samples}-bench-floor", partitions=settings.samples_partitions),
        TopicSpec(name=f"{settings.topic_samples}-bench-floor-states", partitions=settings.event_partitions),
    ]


async def consume_produce(settings: Settings, total: int) -> tuple[float, float]:
    """The I/O floor of any joiner: an aiokafka loop that consumes the event topics and writes two
    records per event - the event's own bytes to a samples-like topic (a sample is about as
    large) and a state-sized record to a changelog-like one, on the event's partition - with no
    join at all, gathered and produced as record batches (``BatchSender``) once per sweep interval,
    up to two flushes' acks awaited at a time (``MAX_INFLIGHT``), as the joiner does. The joiner writes ~1.8 records per
    event (0.93 samples and dead letters, under one state each), so this floor is a little below
    a free join core's. (Events/s, this process's CPU microseconds per event), from the first
    records in hand to the last, as ``_consume_only``."""
    from aiokafka import AIOKafkaProducer

    from stream.join.flusher import MAX_INFLIGHT
    from stream.kafka.partitioner import key_partition
    from stream.kafka.sender import BatchSender

    cfg = settings.aiokafka_config()
    consumer = _event_consumer(settings, f"{settings.topic_samples}-bench-floor")
    producer = AIOKafkaProducer(linger_ms=5, max_batch_size=settings.joiner_producer_max_batch_bytes, **cfg)  # the joiner's
    samples, states = (spec.name for spec in floor_topics(settings))
    await consumer.start()
    await producer.start()
    sample_partitions = list(range(settings.samples_partitions))
    sender = BatchSender(producer, lambda _t, k: key_partition(k, sample_partitions))
    interval = settings.joiner_sweep_interval_ms / 1000
    inflight: list[asyncio.Future[Any]] = []

    async def acks(batches: list[Any]) -> None:
        for sent in await sender.submit(batches):
            await sent.last_offset()

    n, n0, t0, cpu0, last = 0, 0, 0.0, 0.0, time.monotonic()
    try:
        while n < total:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                n += len(msgs)
                for m in msgs:
                    sender.add(samples, m.key, m.value)
                    sender.add(states, m.key, FLOOR_STATE, m.partition)
            if batch and not t0:
                # as the consume-only loop: counted from the records in hand
                t0, n0, cpu0 = time.monotonic(), n, time.process_time()
            while inflight and inflight[0].done():
                inflight.pop(0).result()
            if time.monotonic() - last >= interval and len(inflight) < MAX_INFLIGHT:
                inflight.append(asyncio.ensure_future(acks(sender.take())))
                last = time.monotonic()
        for fut in inflight:
            await fut
        await acks(sender.take())
        events = max(n - n0, 1)
        return events / (time.monotonic() - t0), (time.process_time() - cpu0) * 1e6 / events
    finally:
        await consumer.stop()
        await producer.stop()


async def _plain_join(settings: Settings, total: int, datadir: Path) -> float:
    """aiokafka consume -> FunnelJoin on rocksdict -> aiokafka produce; events/s."""
    from aiokafka import AIOKafkaProducer, TopicPartition

    from stream.join.app import funnel_config, join_topics
    from stream.join.driver import FunnelJoin, Output
    from stream.join.rocksdb_store import RocksDBStore
    from stream.ops.clock import SystemClock

    cfg = settings.aiokafka_config()
    consumer = _event_consumer(settings, "aitm-bench-plain")
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
            for tp, msgs in batch.items():  # a fetched batch at a time, as the joiner
                hw = consumer.highwater(TopicPartition(tp.topic, tp.partition))
                out: list[Output] = []
                join.on_batch([(m.topic, m.partition, m.key, m.value, m.offset, hw is not None and m.offset + 1 < hw)
                               for m in msgs], out)  # fmt: skip
                wm = None
                if join.sweep_due(tp.partition):
                    join.sweep(tp.partition, out)
                    wm = join.take_sweep(tp.partition)
                futs = [await producer.send(o.topic, o.value, key=o.key) for o in out]
                if wm is not None:
                    if futs:
                        await asyncio.gather(*futs)
                    join.persist_swept(tp.partition, wm)
                n += len(msgs)
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

    load_at_start = round(os.getloadavg()[0], 2)
    work = Path(tempfile.mkdtemp(prefix="aitm-bench-joiner-"))
    try:
        figures = _run(args, work)
    finally:  # the stores and logs of three joiners: not kept (they filled the disk once)
        shutil.rmtree(work, ignore_errors=True)
    (joiner, noop, plain, consume, consume_first, joiner_cpu, noop_cpu, joiner_polls, joiner_end_window, total,
     floor, floor_cpu, py_joiner, py_cpu, python_first, joiner_polled) = figures  # fmt: skip
    result = {
        "joiner_events_per_s": round(joiner, 1),
        "faust_noop_events_per_s": round(noop, 1),
        "plain_join_events_per_s": round(plain, 1),
        "ratio_to_noop": _ratio(joiner, noop),
        "ratio_to_plain": _ratio(joiner, plain),
        "consume_events_per_s": round(consume, 1),
        "ratio_to_consume": _ratio(joiner, consume),
        "cpu_us_per_event": round(joiner_cpu, 1),
        "consume_produce_events_per_s": round(floor, 1),
        "ratio_to_consume_produce": _ratio(joiner, floor),
        "consume_produce_cpu_us_per_event": round(floor_cpu, 1),
        "faust_noop_cpu_us_per_event": round(noop_cpu, 1),
        # the same joiner with its compiled common path off (JOINER_FAST_CORE=false), same run
        "python_core_events_per_s": round(py_joiner, 1),
        "python_core_cpu_us_per_event": round(py_cpu, 1),
        "cpu_ratio_to_python_core": _ratio(joiner_cpu, py_cpu),
        "python_core_ran_first": python_first,
        "events": total,
        "cpu_count": os.cpu_count(),
        "load_1min_at_start": load_at_start,
        "joiner_metric_polls": joiner_polls,
        "joiner_end_window_s": round(joiner_end_window, 3),
        # the joiner timed by the polls alone (its end late by up to a poll interval), for comparison
        "joiner_polled_events_per_s": round(joiner_polled, 1),
        "consume_first_batch_events": consume_first,
    }
    print(write_json(args.json, result), end="")
    return 0


def _run(
    args: argparse.Namespace, work: Path
) -> tuple[float, float, float, float, int, float, float, int, float, int, float, float, float, float, bool, float]:
    """The bench's runs in ``work``: the joiner's, the no-op agent's, the plain join's, the
    consume-only loop's and the consume-and-produce floor's figures."""
    from simulators.faults import FaultConfig, SimulatedStream
    from simulators.funnel import FunnelSimulator, SimConfig
    from simulators.kafka_sink import produce

    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        settings = load_settings(kafka_bootstrap_servers=broker.bootstrap, data_dir=work / "data")
        ensure_topics(settings.kafka_python_config(), settings.topic_specs())
        sim = FunnelSimulator(SimConfig(seed=args.seed, impressions_per_day=args.impressions_per_day))
        records = list(SimulatedStream(sim, days=args.days, faults=FaultConfig.uniform(0.002)))
        produce(records, settings)
        total = len(records)
        print(f"produced {total} records to {broker.bootstrap}", flush=True)

        consume, consume_first = asyncio.run(_consume_only(settings, total))
        print(f"aiokafka consume-only loop: {consume:,.0f} events/s (first batch {consume_first}, not timed)", flush=True)
        port = free_port()
        noop, noop_cpu, _, _, _ = _measure_process(
            [sys.executable, "-m", "stream.cli", "bench", "joiner", "--noop-worker", str(port), str(work / "noop")],
            _env(settings), port, "aitm_bench_noop_events_total", total, args.timeout,
        )
        print(f"faust no-op agent: {noop:,.0f} events/s", flush=True)
        # the joiner as shipped (its compiled common path on) and with the Python core alone, in a
        # random order: each its own group, store and changelog over the same records
        runs: dict[str, tuple[float, float, int, float, float]] = {}
        cores = ["fast", "python"]
        random.shuffle(cores)
        for core in cores:
            port = free_port()
            runs[core] = _measure_process(
                [sys.executable, "-m", "stream.cli", "joiner"],
                _env(settings, METRICS_PORT_JOINER=str(port), DATA_DIR=str(work / f"joiner-{core}"),
                     JOINER_APP_ID=f"aitm-bench-joiner-{core}", JOINER_FAST_CORE=str(core == "fast").lower()),
                port, "aitm_joiner_events_total", total, args.timeout, stamp="aitm_joiner_last_event_timestamp_seconds",
            )  # fmt: skip
            print(f"faust joiner ({core} core): {runs[core][0]:,.0f} events/s, {runs[core][1]:.1f} us CPU per event",
                  flush=True)  # fmt: skip
        joiner, joiner_cpu, joiner_polls, joiner_end_window, joiner_polled = runs["fast"]
        py_joiner, py_cpu = runs["python"][:2]
        plain = asyncio.run(_plain_join(settings, total, work / "plain"))
        print(f"plain aiokafka + rocksdict join: {plain:,.0f} events/s", flush=True)
        ensure_topics(settings.kafka_python_config(), floor_topics(settings))
        floor, floor_cpu = asyncio.run(consume_produce(settings, total))
        print(f"aiokafka consume + produce, no join (the I/O floor): {floor:,.0f} events/s, {floor_cpu:.1f} us CPU "
              "per event", flush=True)  # fmt: skip
    return (joiner, noop, plain, consume, consume_first, joiner_cpu, noop_cpu, joiner_polls, joiner_end_window, total,
            floor, floor_cpu, py_joiner, py_cpu, cores[0] == "python", joiner_polled)  # fmt: skip


def _ratio(a: float, b: float) -> float | None:
    """a / b to 3 decimals; None when b could not be timed (a stream small enough to come in one
    fetch: run the default size)."""
    return round(a / b, 3) if b > 0 else None
