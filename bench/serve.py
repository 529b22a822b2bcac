"""``aitm-stream bench serve``: the scoring endpoint under a keep-alive load on loopback, as JSON.

Three processes: this one (builds an AITM version of the paper's sizes on simulator features,
publishes it to a model store, starts the others and ramps the rate), the **server** (the
scorer's real HTTP endpoint, ``stream.serve.http``, with the version loaded through the scorer's
loader and its onnxruntime copy built; no Kafka; pinned to CPU 0) and the **load client**
(asyncio protocols on uvloop, ``--connections`` keep-alive connections, pinned to CPU 1; open
loop: requests are due on a fixed schedule whatever the answers, so a slow server is not hidden
by a client that waits for it). Latency is from the request's scheduled time to its last
response byte; the client also reports how late it issued against its schedule (``lag_p99_ms``)
and its own CPU per request. With ``--compare`` (default) a second server runs the old path
(eager torch, asyncio's loop, aiohttp's access-log formatter), measured right after the new one
at the reported single rates and one request at a time (``old_path``, ``ratios_old_over_new``).

For single requests (one impression) and batched ones (``--batch`` impressions per call) it
reports ``p99_ms`` / ``p999_ms`` at 500 and 2,000 requests/s, and ``capacity_rps``: the highest
rate of the ramp whose p999 stays under 20 ms with every request answered 200 and the rate
achieved (the paper's latency bound). JSON (see README, "Serving")::

    {"single": {"capacity_rps": 3000, "rates": {"500": {"p99_ms": .., "p999_ms": .., ...},
                "2000": {...}}, "ramp": [{"rate": 250, ...}, ...]},
     "batched": {"impressions_per_call": 100, "capacity_rps": .., "rates": {...}, "ramp": [...]},
     "old_path": {"single": {"rates": {...}, "one_at_a_time": {...}}, "ratios_old_over_new": {...}},
     "target": {...}, "load": {"before": [1m, 5m, 15m], "after": [...]}, ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Final

import numpy as np

from bench.report import write_json
from stream.ops.settings import Settings

P999_BOUND_MS: Final = 20.0  # the paper's online latency bound
OLD_PATH: Final = ("the endpoint before the speed-ups, same process layout and client: eager torch forward, "
                   "asyncio's selector loop, aiohttp's access-log formatter (answers still msgspec-encoded)")
TARGET_P999_MS: Final = 5.0  # issue 14: at 2,000 requests/s
REPORTED_RATES: Final = (500, 2000)
SINGLE_RAMP: Final = (250, 500, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000)
BATCH_RAMP: Final = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aitm-stream bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=Path("reports/bench_serve.json"))
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per rate (default 8)")
    p.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each rate")
    p.add_argument("--connections", type=int, default=64, help="keep-alive connections of the client")
    p.add_argument("--batch", type=int, default=100, help="impressions per batched call")
    p.add_argument("--single-rates", default=",".join(map(str, SINGLE_RAMP)))
    p.add_argument("--batch-rates", default=",".join(map(str, BATCH_RAMP)))
    p.add_argument("--access-log", choices=("file", "off"), default="file",
                   help="the server's access log: to a file (default, as in production) or off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the server to CPU 0 and the client to CPU 1")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the old path (eager torch, asyncio loop, aiohttp's access-log formatter) "
                        "measured at the reported single rates in the same run")
    # internal: the two child processes
    p.add_argument("--server", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--old-path", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--client", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    two = args.pin and (os.cpu_count() or 1) >= 2
    args.server_cpu, args.client_cpu = (0, 1) if two else (None, None)
    return args


# --- the model version and the request bodies --------------------------------------------------


def build_version(root: Path, seed: int, n: int = 20_000) -> tuple[list[dict[str, str]], list[str]]:
    """Publish version 1 (AITM, paper sizes, the streaming trainer's encoder on simulated
    impressions) to ``root``; returns feature dicts of fresh impressions and their bank ids."""
    import torch

    from aitm.checkpoint import make_checkpoint
    from aitm.embedding_table import DynamicTable
    from aitm.model import AITM, AITMConfig
    from simulators.funnel import FunnelSimulator, SimConfig
    from stream.ops.model_store import ModelStore
    from stream.ops.settings import Settings

    s = Settings()
    torch.manual_seed(seed)
    sim = FunnelSimulator(SimConfig(seed=seed))
    fields = sim.field_names
    enc = DynamicTable(fields, s.trainer_embedding_rows, s.trainer_feature_min_count, s.trainer_embedding_ttl_ms)
    enc.encode_dicts(sim.feature_dicts(sim.day_batch(0, n)), update=True, event_time_ms=np.zeros(n, np.int64))
    cfg = AITMConfig(vocab_sizes=enc.vocab_sizes)
    ModelStore(root).publish(1, make_checkpoint(AITM(cfg), cfg, enc.state_dict(), 0))
    fresh = sim.day_batch(1, 5000)
    return sim.feature_dicts(fresh), [sim.bank_name(int(b)) for b in fresh.bank]


def bodies(feats: list[dict[str, str]], banks: list[str], batch: int) -> list[bytes]:
    """Request bodies: one impression each (``batch`` 1) or ``{"requests": [...]}`` of ``batch``."""
    items = [{"bank_id": b, "features": f, "impression_id": f"b-{i}"}
             for i, (f, b) in enumerate(zip(feats, banks, strict=True))]
    if batch == 1:
        return [json.dumps(x).encode() for x in items]
    return [json.dumps({"requests": items[i:i + batch]}).encode()
            for i in range(0, len(items) - batch + 1, batch)]


# --- server process ----------------------------------------------------------------------------


def run_server(store: Path, access_log: str, old_path: bool = False) -> int:
    """The scorer's HTTP endpoint on an ephemeral port with version 1; prints the port once the
    version's fast copy is ready, runs until SIGTERM. ``old_path``: the endpoint as before the
    speed-ups (eager torch forward, asyncio's event loop, aiohttp's access-log formatter)."""
    import logging

    import torch
    from aiohttp.web_log import AccessLogger
    from prometheus_client import CollectorRegistry

    from stream.ops.settings import Settings
    from stream.serve.http import AccessLog, HttpServer, build_app
    from stream.serve.scorer import Scorer
    from stream.serve.versions import load_version

    s = Settings(model_store_dir=store, scorer_http_access_log=access_log != "off")
    if old_path:
        s = s.model_copy(update={"scorer_http_engine": "torch"})
    torch.set_num_threads(s.scorer_threads)
    if access_log == "file":
        logging.basicConfig(filename=store / f"access{'-old' if old_path else ''}.log", level=logging.INFO,
                            format="%(asctime)s %(message)s")
    scorer = Scorer(s, CollectorRegistry())
    scorer.model = m = load_version(scorer.store, 1, trace=s.scorer_torchscript)
    scorer.fast.build_after = 0  # the steady state: the version's copy built (after BUILD_AFTER impressions)
    if scorer.fast.fast_for(m) is None and s.scorer_http_engine == "onnx":
        scorer.fast.ready.wait(120)
    app = build_app(scorer, max_batch_bytes=s.scorer_http_max_batch_bytes)
    server = HttpServer(app, "127.0.0.1", 0, access_log=s.scorer_http_access_log, use_uvloop=not old_path,
                        access_log_class=AccessLogger if old_path else AccessLog).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(server.server_address[1], flush=True)
    stop.wait()
    server.shutdown()
    return 0


# --- load client process -----------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive connection of the load client: one request at a time, answers read by their
    ``Content-Length`` (what aiohttp's server sends for these answers)."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # bytes of the answer being read, once its head is in
        self.code = ""
        self.due = 0.0  # the scheduled time of the request in flight
        self.measured = False
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def send(self, request: bytes, due: float, measured: bool) -> None:
        assert self.transport is not None
        self.due, self.measured, self.busy = due, measured, True
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).lower()
                at = head.find(b"content-length:")
                if at < 0:
                    raise RuntimeError(f"an answer without Content-Length: {head[:200]!r}")
                eol = head.find(b"\r\n", at)
                length = int(head[at + 15:eol if eol >= 0 else len(head)])
                self.code = head[9:12].decode()
                self.need = end + 4 + length
            if len(self.buf) < self.need:
                return
            del self.buf[: self.need]
            self.need = -1
            self.busy = False
            self.client.answered(self, self.code)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)


class _Client:
    """The open-loop load: requests due on a fixed schedule go out on a free connection, or wait
    (in order) for the next one to free; latency is from the scheduled time to the answer's last
    byte, so neither the client's lag nor a busy server is hidden (no coordinated omission)."""

    def __init__(self, requests: list[bytes]) -> None:
        self.requests = requests
        self.free: list[_Connection] = []
        self.waiting: deque[tuple[bytes, float, bool]] = deque()
        self.lat: list[float] = []
        self.codes: dict[str, int] = {}
        self.answered_total = 0
        self.in_flight = 0

    def issue(self, request: bytes, due: float, measured: bool) -> None:
        self.in_flight += 1
        if self.free:
            self.free.pop().send(request, due, measured)
        else:
            self.waiting.append((request, due, measured))

    def answered(self, conn: _Connection, code: str) -> None:
        self.in_flight -= 1
        self.answered_total += 1
        if conn.measured:
            self.lat.append(time.perf_counter() - conn.due)
            self.codes[code] = self.codes.get(code, 0) + 1
        if self.waiting:
            conn.send(*self.waiting.popleft())
        else:
            self.free.append(conn)

    def lost(self, conn: _Connection) -> None:
        if conn in self.free:
            self.free.remove(conn)
        elif conn.busy:  # a request was in flight on it
            self.in_flight -= 1
            if conn.measured:
                self.codes["connection_lost"] = self.codes.get("connection_lost", 0) + 1


async def _load(port: int, path: str, payloads: list[bytes], rate: float, seconds: float, warmup: float,
                connections: int) -> dict[str, Any]:
    """Issue ``rate`` requests/s on a fixed schedule for ``warmup + seconds``; latencies of the
    measured part (scheduled time to last byte), schedule lag, answers by status."""
    loop = asyncio.get_running_loop()
    requests = [(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n").encode() + body for body in payloads]
    client = _Client(requests)
    conns = []
    for _ in range(connections):
        _, conn = await loop.create_connection(lambda: _Connection(client), "127.0.0.1", port)
        conns.append(conn)
        client.free.append(conn)
    lag: list[float] = []
    cpu0 = time.process_time()
    n = int(rate * (warmup + seconds))
    n_warm = int(rate * warmup)
    start = time.perf_counter() + 0.05
    i = 0
    while i < n:
        now = time.perf_counter()
        due = min(n, int((now - start) * rate) + 1)
        while i < due:
            t_due = start + i / rate
            if i >= n_warm:
                lag.append(now - t_due)
            client.issue(requests[i % len(requests)], t_due, i >= n_warm)
            i += 1
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
    end_issue = time.perf_counter()
    while client.in_flight > 0 and time.perf_counter() - end_issue < 30:
        await asyncio.sleep(0.005)
    if client.in_flight > 0:  # still open 30 s after the last was issued
        client.codes["unanswered_after_30s"] = client.in_flight
    client_cpu = time.process_time() - cpu0
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    measured_s = max(1e-9, end_issue - (start + n_warm / rate))
    a = np.asarray(client.lat) * 1000
    pct = (lambda q: round(float(np.percentile(a, q)), 3)) if len(a) else (lambda q: None)
    return {
        "rate": rate,
        "requests": len(a),
        "achieved_rps": round(len(a) / measured_s, 1),
        "p50_ms": pct(50), "p99_ms": pct(99), "p999_ms": pct(99.9),
        "max_ms": round(float(a.max()), 3) if len(a) else None,
        "lag_p99_ms": round(float(np.percentile(np.asarray(lag) * 1000, 99)), 3) if lag else None,
        "codes": client.codes,
        "answered_total": client.answered_total,
        "client_cpu_ms_per_request": round(client_cpu * 1000 / max(1, client.answered_total), 3),
    }


def run_client(spec_path: Path) -> int:
    """One rate step, described by a JSON file; prints the result as one JSON line."""
    spec = json.loads(spec_path.read_text())
    _pin(spec.get("cpu"))
    payloads = [line.encode() for line in Path(spec["bodies"]).read_text().splitlines() if line]
    from stream.serve.http import new_event_loop

    loop = new_event_loop()  # uvloop when installed: the client's CPU per request is the server's loss
    try:
        out = loop.run_until_complete(_load(spec["port"], spec["path"], payloads, spec["rate"], spec["seconds"],
                                            spec["warmup"], spec["connections"]))
    finally:
        loop.close()
    print(json.dumps(out), flush=True)
    return 0


@contextmanager
def _server(store: Path, args: argparse.Namespace, old_path: bool) -> Iterator[tuple[int, int]]:
    """A server process (pinned to ``args.server_cpu``): (port, pid) once it listens with its
    model ready; SIGTERM on leaving."""
    argv = [sys.executable, "-m", "bench.serve", "--server", str(store), "--access-log", args.access_log]
    if old_path:
        argv.append("--old-path")
    if args.server_cpu is not None:
        argv += ["--cpu", str(args.server_cpu)]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        yield int(server.stdout.readline().strip()), server.pid
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


def _ratios(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Old path / new path of the latency percentiles and the server's CPU per request, per rate."""
    out: dict[str, dict[str, float | None]] = {}
    for rate, o in old.items():
        n = new.get(rate, {})
        out[rate] = {k: (round(o[k] / n[k], 2) if o.get(k) and n.get(k) else None)
                     for k in ("p50_ms", "p99_ms", "p999_ms", "server_cpu_ms_per_request")}
    return out


# --- the ramp ----------------------------------------------------------------------------------


def _pin(cpu: int | None) -> None:
    """Run this process on one CPU (``None``: anywhere), so the client and the server do not take
    each other's core; other processes on the machine still may."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def _ok(step: dict[str, Any]) -> bool:
    return (step["p999_ms"] is not None and step["p999_ms"] < P999_BOUND_MS
            and set(step["codes"]) == {"200"} and step["achieved_rps"] >= 0.97 * step["rate"])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _step(port: int, path: str, body_file: Path, rate: float, seconds: float, warmup: float, connections: int,
          args: argparse.Namespace, work: Path, server_pid: int) -> dict[str, Any]:
    """One rate in a fresh client process: its figures, the load before, the server's CPU per
    answered request (warm-up included: a figure the machine's load moves less than latency)."""
    spec = work / "spec.json"
    spec.write_text(json.dumps({"port": port, "path": path, "bodies": str(body_file), "rate": rate,
                                "seconds": seconds, "warmup": warmup, "connections": connections,
                                "cpu": args.client_cpu}))
    load_before = os.getloadavg()[0]
    cpu_before = _cpu_seconds(server_pid)
    out = subprocess.run([sys.executable, "-m", "bench.serve", "--client", str(spec)],
                         capture_output=True, text=True, check=False, timeout=seconds * 10 + 120)
    if out.returncode != 0:
        raise RuntimeError(f"the load client failed: {out.stderr[-2000:]}")
    step: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    step["load_1m_before"] = round(load_before, 2)
    served = max(1, step.pop("answered_total"))
    step["server_cpu_ms_per_request"] = round((_cpu_seconds(server_pid) - cpu_before) * 1000 / served, 3)
    return step


def one_at_a_time(port: int, path: str, body_file: Path, args: argparse.Namespace, work: Path,
                  server_pid: int, n: int = 3000) -> dict[str, Any]:
    """The server's CPU per request with one request in flight at a time (one connection, the
    next sent when the last is answered): no coalescing, no queue - the endpoint's own cost per
    request, which the machine's load hardly moves (CPU time, not wall time)."""
    step = _step(port, path, body_file, float(n), 1.0, 0.2, 1, args, work, server_pid)
    out = {"requests": step["requests"], "codes": step["codes"],
           "server_cpu_ms_per_request": step["server_cpu_ms_per_request"],
           "client_cpu_ms_per_request": step["client_cpu_ms_per_request"], "load_1m_before": step["load_1m_before"]}
    print(f"  {path} one at a time: server CPU {out['server_cpu_ms_per_request']} ms/req, codes {out['codes']}",
          flush=True)
    return out


def ramp(port: int, path: str, body_file: Path, rates: list[float], args: argparse.Namespace,
         work: Path, server_pid: int, twin: tuple[int, int] | None = None) -> dict[str, Any]:
    """Step through ``rates`` (each in a fresh client process) until two fail the 20 ms bound (the
    rates the report names are measured whatever); the figures of each step and the capacity.
    ``twin`` (port, pid): another server (the old path) measured right after each reported rate,
    so both meet about the same machine load; its figures under ``twin_rates``."""
    steps: list[dict[str, Any]] = []
    twin_rates: dict[str, Any] = {}
    failed = 0
    for rate in rates:
        if failed >= 2 and rate not in REPORTED_RATES:
            continue  # past the knee: only the rates the report names
        step = _step(port, path, body_file, rate, args.seconds, args.warmup, args.connections, args, work, server_pid)
        load_before = step["load_1m_before"]
        step["under_20ms"] = _ok(step)
        steps.append(step)
        print(f"  {path} {rate:>6} req/s: achieved {step['achieved_rps']:>8} p50 {step['p50_ms']} "
              f"p99 {step['p99_ms']} p999 {step['p999_ms']} ms, lag p99 {step['lag_p99_ms']} ms, "
              f"codes {step['codes']}, server CPU {step['server_cpu_ms_per_request']} ms/req, load {load_before:.2f}",
              flush=True)
        if twin is not None and rate in REPORTED_RATES:
            other = _step(twin[0], path, body_file, rate, args.seconds, args.warmup, args.connections, args, work, twin[1])
            twin_rates[str(int(rate))] = _pick(other)
            print(f"  {path} {rate:>6} req/s, old path: p50 {other['p50_ms']} p99 {other['p99_ms']} p999 "
                  f"{other['p999_ms']} ms, codes {other['codes']}, server CPU {other['server_cpu_ms_per_request']} "
                  f"ms/req, load {other['load_1m_before']:.2f}", flush=True)
        if not step["under_20ms"]:
            failed += 1
    passing = [s["rate"] for s in steps if s["under_20ms"]]
    return {
        "capacity_rps": max(passing) if passing else 0,
        "rates": {str(r): _pick(s) for s in steps for r in REPORTED_RATES if s["rate"] == r},
        "ramp": steps,
        **({"twin_rates": twin_rates} if twin is not None else {}),
    }


def _pick(step: dict[str, Any]) -> dict[str, Any]:
    keys = ("p50_ms", "p99_ms", "p999_ms", "max_ms", "achieved_rps", "lag_p99_ms", "codes", "server_cpu_ms_per_request",
            "client_cpu_ms_per_request", "load_1m_before")
    return {k: step[k] for k in keys}


def main(argv: list[str] | None = None) -> int:
    """Ramp single and batched keep-alive loads against the scoring endpoint; write the JSON."""
    args = _parse(argv)
    if args.server is not None:
        _pin(args.cpu)
        return run_server(args.server, args.access_log, args.old_path)
    if args.client is not None:
        return run_client(args.client)
    single_rates = [float(x) for x in args.single_rates.split(",") if x]
    batch_rates = [float(x) for x in args.batch_rates.split(",") if x]
    for r in REPORTED_RATES:  # the reported rates are always measured
        if r not in single_rates:
            single_rates = sorted([*single_rates, r])
        if r not in batch_rates:
            batch_rates = sorted([*batch_rates, r])
    report: dict[str, Any] = {
        "command": "aitm-stream bench serve " + " ".join(argv if argv is not None else sys.argv[3:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load": {"before": [round(x, 2) for x in os.getloadavg()]},
        "server": "stream.serve.http (aiohttp on uvloop, onnxruntime forward, msgspec answers) in its own process, "
                  f"one torch/onnxruntime thread, {'pinned to CPU 0' if args.server_cpu is not None else 'not pinned'}",
        "client": f"asyncio protocol on uvloop, {args.connections} keep-alive connections, open loop, latency from "
                  f"the scheduled time, its own process, {'pinned to CPU 1' if args.client_cpu is not None else 'not pinned'}",
        "seconds_per_rate": args.seconds,
        "access_log": args.access_log,
        "torchscript": Settings().scorer_torchscript,
    }
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        store = work / "models"
        print("building a model version ...", flush=True)
        feats, banks = build_version(store, args.seed)
        single_file, batch_file = work / "single.ndjson", work / "batch.ndjson"
        single_file.write_text("\n".join(b.decode() for b in bodies(feats, banks, 1)))
        batch_file.write_text("\n".join(b.decode() for b in bodies(feats, banks, args.batch)))
        with _server(store, args, old_path=False) as (port, pid), \
                (_server(store, args, old_path=True) if args.compare else nullcontext(None)) as twin:
            print(f"server on port {port}; single requests:", flush=True)
            cost = one_at_a_time(port, "/score", single_file, args, work, pid)
            old_cost = one_at_a_time(twin[0], "/score", single_file, args, work, twin[1]) if twin else None
            single = ramp(port, "/score", single_file, single_rates, args, work, pid, twin)
            old = single.pop("twin_rates", None)
            report["single"] = {"impressions_per_call": 1, **single, "one_at_a_time": cost}
            if old is not None and old_cost is not None:
                ratios = _ratios(old, report["single"]["rates"])
                ratios["one_at_a_time"] = _ratios({"x": old_cost}, {"x": cost})["x"]
                report["old_path"] = {"server": OLD_PATH, "single": {"rates": old, "one_at_a_time": old_cost},
                                      "ratios_old_over_new": ratios}
            print(f"batched requests ({args.batch} impressions per call):", flush=True)
            report["batched"] = {"impressions_per_call": args.batch,
                                 **ramp(port, "/score/batch", batch_file, batch_rates, args, work, pid)}
            log = store / "access.log"
            report["access_log_lines"] = sum(1 for _ in log.open()) if log.exists() else 0
    report["target"] = {"p999_ms_at_2000_rps_max": TARGET_P999_MS}
    for kind in ("single", "batched"):
        at2000 = report[kind]["rates"].get("2000", {})
        report["target"][f"{kind}_p999_ms_at_2000_rps"] = at2000.get("p999_ms")
        report["target"]["met" if kind == "single" else "batched_met"] = (
            at2000.get("p999_ms") is not None and at2000["p999_ms"] <= TARGET_P999_MS
            and set(at2000.get("codes", {})) == {"200"} and at2000["achieved_rps"] >= 0.97 * 2000)
    report["load"]["after"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    write_json(args.json, report)
    print(json.dumps({k: report[k] for k in ("target", "load")}), flush=True)
    print(f"single capacity {report['single']['capacity_rps']} req/s, batched "
          f"{report['batched']['capacity_rps']} req/s; wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
