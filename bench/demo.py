"""``aitm-stream demo``: the whole pipeline of the Procfile on the embedded broker.

Starts broker, joiner, trainer, scorer and Prometheus, streams about 21 simulated days with
drift and a few faults, shows a live progress line, then stops every process cleanly, prints a
summary table and writes an HTML report with plots (``reports/demo.html``). Ctrl-C stops
everything with nothing left running.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from bench.demo_report import Timeline, write_report
from bench.supervisor import Supervisor, read_procfile, scrape, wait_http
from stream.ops.command import command_parser

TASKS = ("click", "application", "approval", "activation")
DEFAULT_PORTS = {
    "EMBEDDED_BROKER_PORT": 9092,
    "METRICS_PORT_BROKER": 9400,
    "METRICS_PORT_SIMULATOR": 9401,
    "METRICS_PORT_JOINER": 9402,
    "METRICS_PORT_TRAINER": 9403,
    "METRICS_PORT_SCORER": 9404,
    "SCORER_HTTP_PORT": 8080,
    "PROMETHEUS_PORT": 9090,
}


def _port(preferred: int) -> int:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("demo")
    p.add_argument("--days", type=float, default=21, help="simulated days to stream")
    p.add_argument("--impressions-per-day", type=int, default=10_000)
    p.add_argument("--minutes", type=float, default=7.0, help="target wall minutes for the stream")
    p.add_argument("--drift", type=float, default=0.03)
    p.add_argument("--fault-rate", type=float, default=0.002)
    p.add_argument("--report", type=Path, default=Path("reports/demo.html"))
    p.add_argument("--data-dir", type=Path, default=Path(".data/demo"))
    p.add_argument("--no-prometheus", action="store_true")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to let the trainer catch up")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data_dir.exists():
        shutil.rmtree(args.data_dir)
    ports = {name: _port(default) for name, default in DEFAULT_PORTS.items()}
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update({k: str(v) for k, v in ports.items()})
    bootstrap = f"127.0.0.1:{ports['EMBEDDED_BROKER_PORT']}"
    env.update({"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATA_DIR": str(args.data_dir.resolve())})
    # Tansu's ListOffsets is wrong: faust's recovery check must be off on it (BROKER.md)
    env["JOINER_RECOVERY_CONSISTENCY_CHECK"] = "false"
    procfile = read_procfile()
    days = max(1, round(args.days))
    speedup = days * 86_400 / (args.minutes * 60)
    procfile["simulator"] = [
        *procfile["simulator"][:3], "simulate", "--days", str(days),
        "--impressions-per-day", str(args.impressions_per_day), "--drift", str(args.drift),
        "--fault-rate", str(args.fault_rate), "--speedup", f"{speedup:.0f}", "--quiet",
        "--stop-at-day", str(days + 0.25),
    ]  # fmt: skip
    stop = {"now": False}

    def interrupt(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    url = {
        n: f"http://127.0.0.1:{ports[f'METRICS_PORT_{n.upper()}']}/metrics"
        for n in ("simulator", "joiner", "trainer", "scorer")
    }
    timeline = Timeline()
    sup = Supervisor(
        {**env, "EMBEDDED_BROKER_PORT": str(ports["EMBEDDED_BROKER_PORT"])}, args.data_dir / "logs"
    )
    codes: dict[str, int | None] = {}
    t_start = time.monotonic()
    try:
        # the broker is the embedded one: no KAFKA_BOOTSTRAP_SERVERS for it
        sup.start("broker", procfile["broker"], {"KAFKA_BOOTSTRAP_SERVERS": ""})
        wait_http(f"http://127.0.0.1:{ports['METRICS_PORT_BROKER']}/metrics", 30, lambda: sup.alive("broker"))
        _wait_topics(sup, args.data_dir / "logs" / "broker.log")
        print(f"broker (Tansu) on {bootstrap}; data in {args.data_dir}")
        for name in ("joiner", "trainer", "scorer"):
            sup.start(name, procfile[name])
        if not args.no_prometheus:
            sup.start("prometheus", procfile["prometheus"])
            print(f"Prometheus on http://127.0.0.1:{ports['PROMETHEUS_PORT']}")
        for name in ("joiner", "trainer", "scorer"):
            wait_http(url[name], 90, lambda n=name: sup.alive(n))  # type: ignore[misc]
        print(
            f"streaming {days} simulated days x {args.impressions_per_day} impressions at {speedup:.0f}x ..."
        )
        sup.start("simulator", procfile["simulator"])
        tty = sys.stdout.isatty()
        drained_since: float | None = None
        last_trained = -1.0
        while not stop["now"]:
            time.sleep(2.0)
            snap = {name: scrape(u) for name, u in url.items()}
            timeline.add(time.monotonic() - t_start, snap)
            if tty:
                print("\r" + timeline.progress_line(days), end="", flush=True)
            elif len(timeline.times) % 5 == 1:
                print(timeline.progress_line(days), flush=True)
            for name in ("joiner", "trainer", "scorer"):
                if not sup.alive(name):
                    raise RuntimeError(f"{name} exited:\n{sup.tail(name)}")
            if not sup.alive("simulator"):
                trained = timeline.last("trainer", "aitm_trainer_trained_samples_total")
                if trained != last_trained:
                    drained_since, last_trained = time.monotonic(), trained
                elif drained_since and time.monotonic() - drained_since > 6:
                    break
                if drained_since and time.monotonic() - drained_since > args.drain_timeout:
                    break
        print()
        if stop["now"]:
            print("interrupted: stopping every process")
    finally:
        codes = sup.stop_all(order=["simulator", "scorer", "trainer", "joiner", "prometheus", "broker"])
    if stop["now"]:
        return 130
    wall = time.monotonic() - t_start
    print(timeline.summary(wall))
    bad = {n: c for n, c in codes.items() if c not in (0, None) and n != "simulator"}
    print("processes stopped: " + ", ".join(f"{n}={c}" for n, c in codes.items()))
    write_report(timeline, args.report, wall)
    print(f"report: {args.report}")
    return 1 if bad else 0


def _wait_topics(sup: Supervisor, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and "broker ready" in log.read_text(errors="replace"):
            return
        if not sup.alive("broker"):
            raise RuntimeError(f"the broker exited:\n{sup.tail('broker')}")
        time.sleep(0.2)
    raise TimeoutError("the broker did not create its topics in time")


if __name__ == "__main__":
    sys.exit(main())
