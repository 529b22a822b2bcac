"""``aitm-stream bench serve``: the scoring endpoint under a keep-alive load on loopback, as JSON.

Three processes: this one (builds an AITM version of the paper's sizes on simulator features,
publishes it to a model store, starts the others and ramps the rate), the **server** (the
scorer's real HTTP endpoint, ``stream.serve.http``, with the version loaded through the scorer's
loader; no Kafka) and the **load client** (aiohttp, ``--connections`` keep-alive connections,
open loop: requests are issued on a fixed schedule whatever the answers, so a slow server is
not hidden by a client that waits for it). Latency is from the request's issue to its last
response byte; the client also reports how late it issued against its schedule (``lag_p99_ms``),
so a client that could not keep up shows.

For single requests (one impression) and batched ones (``--batch`` impressions per call) it
reports ``p99_ms`` / ``p999_ms`` at 500 and 2,000 requests/s, and ``capacity_rps``: the highest
rate of the ramp whose p999 stays under 20 ms with every request answered 200 and the rate
achieved (the paper's latency bound). JSON (see README, "Serving")::

    {"single": {"capacity_rps": 3000, "rates": {"500": {"p99_ms": .., "p999_ms": .., ...},
                "2000": {...}}, "ramp": [{"rate": 250, ...}, ...]},
     "batched": {"impressions_per_call": 100, "capacity_rps": .., "rates": {...}, "ramp": [...]},
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
from pathlib import Path
from typing import Any, Final

import numpy as np

from bench.report import write_json
from stream.ops.settings import Settings

P999_BOUND_MS: Final = 20.0  # the paper's online latency bound
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
    # internal: the two child processes
    p.add_argument("--server", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--client", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


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


def run_server(store: Path, access_log: str) -> int:
    """The scorer's HTTP endpoint on an ephemeral port with version 1; prints the port, runs until
    SIGTERM."""
    import logging

    import torch
    from prometheus_client import CollectorRegistry

    from stream.ops.settings import Settings
    from stream.serve.scorer import Scorer
    from stream.serve.versions import load_version

    s = Settings(model_store_dir=store, scorer_http_access_log=access_log != "off")
    torch.set_num_threads(s.scorer_threads)
    if access_log == "file":
        logging.basicConfig(filename=store / "access.log", level=logging.INFO, format="%(asctime)s %(message)s")
    scorer = Scorer(s, CollectorRegistry())
    scorer.model = load_version(scorer.store, 1, trace=s.scorer_torchscript)
    server = scorer.serve_http("127.0.0.1", 0)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(server.server_address[1], flush=True)
    stop.wait()
    scorer.close()
    return 0


# --- load client process -----------------------------------------------------------------------


async def _load(port: int, path: str, payloads: list[bytes], rate: float, seconds: float, warmup: float,
                connections: int) -> dict[str, Any]:
    """Issue ``rate`` requests/s on a fixed schedule for ``warmup + seconds``; latencies of the
    measured part (issue to last byte), schedule lag, non-200 answers."""
    import aiohttp

    url = f"http://127.0.0.1:{port}{path}"
    headers = {"Content-Type": "application/json"}
    lat: list[float] = []
    lag: list[float] = []
    codes: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()
    answered = 0  # warm-up included
    connector = aiohttp.TCPConnector(limit=connections, force_close=False, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(body: bytes, measured: bool) -> None:
            nonlocal answered
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    code = str(resp.status)
            except aiohttp.ClientError as exc:
                code = type(exc).__name__
            answered += 1
            if measured:
                lat.append(time.perf_counter() - t0)
                codes[code] = codes.get(code, 0) + 1

        n = int(rate * (warmup + seconds))
        n_warm = int(rate * warmup)
        start = time.perf_counter() + 0.05
        i = 0
        while i < n:
            now = time.perf_counter()
            due = min(n, int((now - start) * rate) + 1)
            while i < due:
                if i >= n_warm:
                    lag.append(now - (start + i / rate))
                task = asyncio.create_task(one(payloads[i % len(payloads)], i >= n_warm))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        end_issue = time.perf_counter()
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        unanswered = len(tasks)  # still open 30 s after the last was issued: counted, then cancelled
        if unanswered:
            codes["unanswered_after_30s"] = unanswered
    measured_s = max(1e-9, end_issue - (start + n_warm / rate))
    a = np.asarray(lat) * 1000
    pct = (lambda q: round(float(np.percentile(a, q)), 3)) if len(a) else (lambda q: None)
    return {
        "rate": rate,
        "requests": len(lat),
        "achieved_rps": round(len(lat) / measured_s, 1),
        "p50_ms": pct(50), "p99_ms": pct(99), "p999_ms": pct(99.9),
        "max_ms": round(float(a.max()), 3) if len(a) else None,
        "lag_p99_ms": round(float(np.percentile(np.asarray(lag) * 1000, 99)), 3) if lag else None,
        "codes": codes,
        "answered_total": answered,
    }


def run_client(spec_path: Path) -> int:
    """One rate step, described by a JSON file; prints the result as one JSON line."""
    spec = json.loads(spec_path.read_text())
    payloads = [line.encode() for line in Path(spec["bodies"]).read_text().splitlines() if line]
    out = asyncio.run(_load(spec["port"], spec["path"], payloads, spec["rate"], spec["seconds"],
                            spec["warmup"], spec["connections"]))
    print(json.dumps(out), flush=True)
    return 0


# --- the ramp ----------------------------------------------------------------------------------


def _ok(step: dict[str, Any]) -> bool:
    return (step["p999_ms"] is not None and step["p999_ms"] < P999_BOUND_MS
            and set(step["codes"]) == {"200"} and step["achieved_rps"] >= 0.97 * step["rate"])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ramp(port: int, path: str, body_file: Path, rates: list[float], args: argparse.Namespace,
         work: Path, server_pid: int) -> dict[str, Any]:
    """Step through ``rates`` (each in a fresh client process) until two fail the 20 ms bound (the
    rates the report names are measured whatever); the figures of each step and the capacity."""
    steps: list[dict[str, Any]] = []
    failed = 0
    for rate in rates:
        if failed >= 2 and rate not in REPORTED_RATES:
            continue  # past the knee: only the rates the report names
        spec = work / "spec.json"
        spec.write_text(json.dumps({"port": port, "path": path, "bodies": str(body_file), "rate": rate,
                                    "seconds": args.seconds, "warmup": args.warmup,
                                    "connections": args.connections}))
        load_before = os.getloadavg()[0]
        cpu_before = _cpu_seconds(server_pid)
        out = subprocess.run([sys.executable, "-m", "bench.serve", "--client", str(spec)],
                             capture_output=True, text=True, check=True, timeout=args.seconds * 10 + 120)
        step = json.loads(out.stdout.strip().splitlines()[-1])
        step["load_1m_before"] = round(load_before, 2)
        # the server's CPU per answered request (its warm-up included): a figure the load moves less
        served = max(1, step.pop("answered_total"))
        step["server_cpu_ms_per_request"] = round((_cpu_seconds(server_pid) - cpu_before) * 1000 / served, 3)
        step["under_20ms"] = _ok(step)
        steps.append(step)
        print(f"  {path} {rate:>6} req/s: achieved {step['achieved_rps']:>8} p50 {step['p50_ms']} "
              f"p99 {step['p99_ms']} p999 {step['p999_ms']} ms, lag p99 {step['lag_p99_ms']} ms, "
              f"codes {step['codes']}, server CPU {step['server_cpu_ms_per_request']} ms/req, load {load_before:.2f}",
              flush=True)
        if not step["under_20ms"]:
            failed += 1
    passing = [s["rate"] for s in steps if s["under_20ms"]]
    return {
        "capacity_rps": max(passing) if passing else 0,
        "rates": {str(r): _pick(s) for s in steps for r in REPORTED_RATES if s["rate"] == r},
        "ramp": steps,
    }


def _pick(step: dict[str, Any]) -> dict[str, Any]:
    keys = ("p50_ms", "p99_ms", "p999_ms", "max_ms", "achieved_rps", "lag_p99_ms", "codes", "server_cpu_ms_per_request")
    return {k: step[k] for k in keys}


def main(argv: list[str] | None = None) -> int:
    """Ramp single and batched keep-alive loads against the scoring endpoint; write the JSON."""
    args = _parse(argv)
    if args.server is not None:
        return run_server(args.server, args.access_log)
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
        "server": "stream.serve.http (aiohttp) in its own process, torch threads = SCORER_THREADS (1)",
        "client": f"aiohttp, {args.connections} keep-alive connections, open loop, its own process",
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
        server = subprocess.Popen([sys.executable, "-m", "bench.serve", "--server", str(store),
                                   "--access-log", args.access_log], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline().strip())
            print(f"server on port {port}; single requests:", flush=True)
            report["single"] = {"impressions_per_call": 1, **ramp(port, "/score", single_file, single_rates, args, work, server.pid)}
            print(f"batched requests ({args.batch} impressions per call):", flush=True)
            report["batched"] = {"impressions_per_call": args.batch,
                                 **ramp(port, "/score/batch", batch_file, batch_rates, args, work,
                                        server.pid)}
            log = store / "access.log"
            report["access_log_lines"] = sum(1 for _ in log.open()) if log.exists() else 0
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
    at2000 = report["single"]["rates"].get("2000", {})
    report["target"] = {
        "p999_ms_at_2000_rps_max": TARGET_P999_MS,
        "single_p999_ms_at_2000_rps": at2000.get("p999_ms"),
        "met": at2000.get("p999_ms") is not None and at2000["p999_ms"] <= TARGET_P999_MS
        and set(at2000.get("codes", {})) == {"200"},
    }
    report["load"]["after"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    write_json(args.json, report)
    print(json.dumps({k: report[k] for k in ("target", "load")}), flush=True)
    print(f"single capacity {report['single']['capacity_rps']} req/s, batched "
          f"{report['batched']['capacity_rps']} req/s; wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
