"""``aitm-stream bench stream``: the streaming learner end to end, as JSON.

1. Live: the embedded broker, the simulator (drift) at full speed, and the real ``joiner``,
   ``trainer`` and ``scorer`` processes. An HTTP prober records which model version the scorer
   serves; ``freshness_s`` = first time the scorer answers with a version minus the time the
   trainer consumed the oldest sample new in it (from the ``model-versions`` announcements).
2. Latency: a steady load of single-impression requests on the scorer's HTTP endpoint, the
   machine otherwise quiet (``score_latency_p99_ms`` / ``p999``, client-side wall time).
3. Throughput: a fresh trainer process over the whole ``samples`` backlog
   (``train_samples_per_s``), against the offline ``bench train`` figure of the same run.
4. Quality: the joiner's sample stream, collected once from the broker, replayed through the
   trainer core (``OnlineLearner``) for every mode so they all see identical samples;
   ``auc_final`` per task on final labels, over impressions after the frozen model's training days.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aitm.embedding_table import DynamicTable
from aitm.evaluate import auc
from aitm.train import pick_device
from bench.report import write_json
from bench.supervisor import Supervisor, wait_http
from bench.topic_reader import TopicTail, read_topic
from simulators.faults import SimulatedStream
from simulators.funnel import DAY_MS, EPOCH_MS, FunnelSimulator, SimConfig
from simulators.kafka_sink import produce
from stream.contract.events import TASKS
from stream.contract.samples import Sample, parse_sample
from stream.contract.versions import parse_version
from stream.kafka.broker import EmbeddedBroker, ensure_topics, free_port
from stream.learn.learner import OnlineLearner, model_options
from stream.learn.sample_batch import N_TASKS
from stream.learn.stabilisers import Stabilisers, stabilisers_from
from stream.ops.command import command_parser
from stream.ops.settings import Settings

MAIN_TASKS = ("approval", "activation")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("bench stream")
    p.add_argument("--json", type=Path, default=Path("reports/bench_stream.json"))
    p.add_argument("--quick", action="store_true", help="fewer impressions per day and requests (~3 min)")
    p.add_argument("--days", type=int, default=21, help="simulated days of impressions (>= 20)")
    p.add_argument("--impressions-per-day", type=int, default=None, help="default 4000 (quick 1500)")
    p.add_argument("--drift", type=float, default=0.05, help="radians/day of concept drift")
    p.add_argument("--frozen-days", type=int, default=4, help="days the frozen model trains on")
    p.add_argument("--batch", type=int, default=500, help="trainer batch (the sim is small: more steps)")
    p.add_argument("--lr", type=float, default=Settings.model_fields["trainer_lr"].default,
                   help="trainer learning rate for online updates (default TRAINER_LR's)")
    p.add_argument("--speedup", type=float, default=12000.0, help="simulated seconds per wall second")
    p.add_argument("--latency-requests", type=int, default=None, help="default 20000 (quick 5000)")
    p.add_argument("--latency-rate", type=float, default=500.0, help="requests per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="the trainers' device: auto, cpu or cuda (default TRAINER_DEVICE)")
    p.add_argument("--trainer-workers", type=int, default=1, metavar="N",
                   help="trainer ranks under torchrun (gloo on CPU); N > 1 also runs a 1-rank backlog trainer "
                        "for the ratios")
    p.add_argument("--backlog-repeats", type=int, default=1, metavar="K",
                   help="run each backlog trainer (N ranks, and 1 rank when N > 1) K times on the same samples: "
                        "every run's AUC, their mean and spread")
    p.add_argument("--keep", type=Path, default=None, help="keep logs and data here")
    return p.parse_args(argv)


# --- processes ---------------------------------------------------------------------------------


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    dt = time.perf_counter() - t0
    return dt, json.loads(data) if resp.status == 200 else {}


class Prober(threading.Thread):
    """Asks the scorer every ``interval`` s; records (wall ms, version) of each answer."""

    def __init__(self, port: int, body: bytes, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.port, self.body, self.interval = port, body, interval
        self.seen: list[tuple[int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self.stop.is_set():
            try:
                _, out = _post(conn, self.body)
                if out:
                    self.seen.append((time.time_ns() // 1_000_000, int(out["model_version"])))
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            self.stop.wait(self.interval)


# --- quality replay ----------------------------------------------------------------------------


def _replay(samples: list[Sample], fields: tuple[str, ...], settings: Settings, mode: str,
            train_until_ms: int | None = None, *, lr: float, batch: int = 500,
            batches: list[list[Sample]] | None = None, stabilisers: Stabilisers | None = None,
            ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Test-then-train over ``samples`` in batches of ``batch`` (or over the given ``batches``),
    with the trainer's stabilisers; returns impression id -> (final labels, prediction)."""
    torch.manual_seed(0)
    table = DynamicTable(fields, settings.trainer_embedding_rows, settings.trainer_feature_min_count,
                         settings.trainer_embedding_ttl_ms)  # the trainer's table, at its default settings
    learner = OnlineLearner(table, mode=mode, lr=lr,
                            stabilisers=stabilisers, **model_options(settings))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    chunks = batches if batches is not None else [samples[i : i + batch] for i in range(0, len(samples), batch)]
    for chunk in chunks:
        if not chunk:
            continue
        train = train_until_ms is None or chunk[0].watermark_ms < train_until_ms
        res = learner.step(chunk, train=train)
        for j, iid in enumerate(res.eval_ids):
            out[iid] = (res.eval_labels[j], res.eval_probs[j])
    return out


def _oracle_batches(samples: list[Sample], batch: int) -> list[list[Sample]]:
    """The stream as an oracle without label delay sees it, cut at the same batch boundaries as
    the real stream: each impression's first sample carries its final labels (all mature) and is
    trained on and evaluated there; its corrections and final are dropped (an impression the
    joiner sent no first for keeps its final, which came within the hour). Same model, batch, lr
    and optimizer steps at the same points in time as the delayed modes - only the labels differ."""
    finals = {s.impression_id: s for s in samples if s.kind == "final"}
    has_first = {s.impression_id for s in samples if s.kind == "first"}
    out = []
    for i in range(0, len(samples), batch):
        chunk = []
        for s in samples[i : i + batch]:
            f = finals.get(s.impression_id)
            if f is None:
                continue
            if s.kind == "first":
                chunk.append(replace(s, kind="final", labels=f.labels, mature=(True,) * 4, seq=5))
            elif s.kind == "final" and s.impression_id not in has_first:
                chunk.append(s)
        out.append(chunk)
    return out


def _aucs(pairs: dict[str, tuple[np.ndarray, np.ndarray]], ids: list[str]) -> dict[str, float]:
    y = np.stack([pairs[i][0] for i in ids])
    p = np.stack([pairs[i][1] for i in ids])
    return {t: round(auc(y[:, k], p[:, k]), 4) for k, t in enumerate(TASKS[:N_TASKS])}


# --- main --------------------------------------------------------------------------------------


@dataclass
class Run:
    """What every phase of one run shares: the work directory, the simulated stream, the broker,
    the processes and the ports."""

    args: argparse.Namespace
    work: Path
    sim: FunnelSimulator
    stream: SimulatedStream
    broker: EmbeddedBroker
    settings: Settings
    procs: Supervisor
    http_port: int
    per_day: int
    n_latency: int
    cli: tuple[str, ...] = (sys.executable, "-m", "stream.cli")


def _setup(args: argparse.Namespace) -> Run:
    """The broker, the topics, the simulated stream and the processes' environment."""
    per_day = args.impressions_per_day or (1500 if args.quick else 4000)
    n_latency = args.latency_requests or (5000 if args.quick else 20000)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    sim = FunnelSimulator(SimConfig(seed=args.seed, impressions_per_day=per_day, drift=args.drift))
    stream = SimulatedStream(sim, args.days, tail_days=16, tail_impressions_per_day=max(50, per_day // 40))
    broker = EmbeddedBroker(log_path=work / "tansu.log").start()
    settings = Settings(kafka_bootstrap_servers=broker.bootstrap, data_dir=work / "data")
    ensure_topics(settings.kafka_python_config(), settings.topic_specs())
    http_port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "DATA_DIR": str(settings.data_dir),
        "SCORER_HTTP_PORT": str(http_port),
        "METRICS_PORT_JOINER": str(free_port()),
        "METRICS_PORT_TRAINER": str(free_port()),
        "METRICS_PORT_SCORER": str(free_port()),
        "PYTHONUNBUFFERED": "1",
        "TRAINER_BATCH_SIZE": str(args.batch),
        "TRAINER_LR": str(args.lr),
        "JOINER_SWEEP_INTERVAL_MS": "50",  # 10 simulated minutes per sweep at 12000x
        "JOINER_MAX_FUTURE_MS": "0",  # simulated event time may run ahead of the wall clock
    }
    if args.device:
        env["TRAINER_DEVICE"] = args.device
    return Run(args, work, sim, stream, broker, settings, Supervisor(env, work), http_port, per_day, n_latency)


def _live(run: Run, report: dict[str, Any]) -> tuple[list[Sample], list[dict[str, str]]]:
    """1. The live pipeline: produce the stream paced, measure freshness through the scorer;
    returns the samples the joiner wrote and the last day's feature maps."""
    args = run.args
    collected: list[Sample] = []
    collector = TopicTail(run.settings, [run.settings.topic_samples], lambda r: collected.append(parse_sample(r.value)))
    collector.start()
    run.procs.start("joiner", [*run.cli, "joiner"])
    run.procs.start("trainer", [*_trainer_cli(run, args.trainer_workers), "--exit-when-idle", "20",
                                "--summary-json", str(run.work / "trainer_live.json")])
    run.procs.start("scorer", [*run.cli, "scorer"])
    feats = run.sim.feature_dicts(run.sim.day_batch(args.days, 2000))
    probe_body = json.dumps({"bank_id": "bank_1", "features": feats[0]}).encode()
    prober = Prober(run.http_port, probe_body)
    prober.start()  # answers 503 until the first version; records versions in use from then on
    t0 = time.monotonic()
    # paced, so the joiner's sweeps see each impression between its first-sample time
    # (+30 min) and its click window's end (+1 h); the low-rate tail (finals only) faster
    records = list(run.stream)
    main_end = EPOCH_MS + args.days * DAY_MS
    counts = produce([r for r in records if r.deliver_ms < main_end], run.settings, speedup=args.speedup)
    for topic, n in produce([r for r in records if r.deliver_ms >= main_end], run.settings,
                            speedup=args.speedup * 8).items():
        counts[topic] = counts.get(topic, 0) + n
    report["events_produced"] = sum(counts.values())
    report["produce_s"] = round(time.monotonic() - t0, 1)
    print(f"produced {report['events_produced']} events in {report['produce_s']}s", flush=True)
    wait_http(f"http://127.0.0.1:{run.http_port}/readyz", 180)
    while collector.idle_for() < 15:  # the joiner has gone quiet
        time.sleep(1)
    report["joiner_s"] = round(time.monotonic() - t0 - 15, 1)
    report["samples"] = len(collected)
    print(f"joiner done: {len(collected)} samples", flush=True)
    if run.procs.children["trainer"].proc.wait(timeout=600) != 0:
        raise RuntimeError("the live trainer failed; see trainer.log")
    time.sleep(2)
    prober.stop.set()
    prober.join()
    collector.stop()
    run.procs.stop("joiner")
    versions = [parse_version(r.value) for r in read_topic(run.settings, run.settings.topic_model_versions, idle_s=2.0)]
    fresh = []
    for v in versions:
        used = next((t for t, ver in prober.seen if ver >= v.version), None)
        if used is not None and prober.seen and prober.seen[0][0] < v.created_at_ms:
            fresh.append((used - v.min_new_sample_consumed_at_ms) / 1000)
    live = json.loads((run.work / "trainer_live.json").read_text())
    report["freshness_s"] = {
        "p50": round(float(np.median(fresh)), 2) if fresh else None,
        "p95": round(float(np.percentile(fresh, 95)), 2) if fresh else None,
        "max": round(max(fresh), 2) if fresh else None,
        "versions_measured": len(fresh),
        "checkpoint_interval_s": run.settings.trainer_checkpoint_interval_ms / 1000,
    }
    report["live_trainer"] = {k: live[k] for k in ("mode", "samples_processed", "trained_rows", "version")}
    report["live_trainer"]["auc_lifetime"] = _live_aucs(live)
    report["live_trainer"]["trainer_workers"] = live.get("trainer_workers", 1)

    return collected, feats


def _latency(run: Run, feats: list[dict[str, str]], report: dict[str, Any]) -> None:
    """2. HTTP latency at a steady load."""
    args = run.args
    bodies = [json.dumps({"bank_id": f"bank_{i % 6}", "features": f}).encode() for i, f in enumerate(feats)]
    conn = http.client.HTTPConnection("127.0.0.1", run.http_port, timeout=5)
    for b in bodies[:200]:
        _post(conn, b)
    lat = []
    period = 1.0 / args.latency_rate
    due = time.perf_counter()
    for i in range(run.n_latency):
        due += period
        lat.append(_post(conn, bodies[i % len(bodies)])[0] * 1000)
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    conn.close()
    la = np.array(lat)
    report.update(score_latency_p50_ms=round(float(np.percentile(la, 50)), 3),
                  score_latency_p99_ms=round(float(np.percentile(la, 99)), 3),
                  score_latency_p999_ms=round(float(np.percentile(la, 99.9)), 3),
                  score_latency_max_ms=round(float(la.max()), 3),
                  score_latency_requests=run.n_latency, score_latency_rate_per_s=args.latency_rate)
    run.procs.stop("scorer")



def _trainer_cli(run: Run, workers: int) -> list[str]:
    """``aitm-stream trainer``, as ``workers`` ranks under torchrun when more than one."""
    if workers <= 1:
        return [*run.cli, "trainer"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers),
            "-m", "stream.cli", "trainer"]


def _live_aucs(summary: dict[str, Any]) -> dict[str, float]:
    """Lifetime prequential AUC per task of a trainer's summary (every rank's finals merged)."""
    return {t: round(summary["quality"]["lifetime"][k]["auc"], 4) for k, t in enumerate(TASKS[:N_TASKS])}


def _backlog(run: Run, workers: int, repeat: int = 0) -> dict[str, Any]:
    """A fresh trainer (``workers`` ranks) over the whole samples backlog: its summary."""
    name = f"trainer_backlog_{workers}" + (f"_{repeat}" if repeat else "")
    out = run.work / f"{name}.json"
    run.procs.start(name, [*_trainer_cli(run, workers), "--no-metrics", "--exit-when-idle", "5",
                           "--summary-json", str(out)], {"DATA_DIR": str(run.work / f"data_{name}")})
    if run.procs.children[name].proc.wait(timeout=900) != 0:
        raise RuntimeError(f"the backlog trainer ({workers} ranks) failed; see {name}.log")
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary


def _runs(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Every run's AUCs on the main tasks, their mean and spread (max - min)."""
    aucs = [_live_aucs(b) for b in summaries]
    return {"auc_final_runs": [{t: a[t] for t in MAIN_TASKS} for a in aucs],
            "auc_final_mean": {t: round(float(np.mean([a[t] for a in aucs])), 4) for t in MAIN_TASKS},
            "auc_final_spread": {t: round(max(a[t] for a in aucs) - min(a[t] for a in aucs), 4) for t in MAIN_TASKS},
            "samples_processed_runs": [b["samples_processed"] for b in summaries]}


def _throughput(run: Run, report: dict[str, Any]) -> None:
    """3. Trainer throughput over the backlog, then the offline figure of the same run; with
    several trainer workers, a 1-worker backlog trainer as well, for ratios measured in one run
    (``--backlog-repeats``: each trainer that many times, alternating, on the same samples)."""
    args = run.args
    workers = args.trainer_workers
    runs: dict[str, list[dict[str, Any]]] = {str(workers): [], "1": []}
    for k in range(max(1, args.backlog_repeats)):
        runs[str(workers)].append(_backlog(run, workers, k))
        if workers > 1:
            runs["1"].append(_backlog(run, 1, k))
    backlog = runs[str(workers)][0]
    report["trainer_workers"] = workers
    report["backlog_repeats"] = max(1, args.backlog_repeats)
    report["backlog_runs"] = {k: _runs(v) for k, v in runs.items() if v}
    if workers > 1:
        one = runs["1"][0]
        by = {"1": one, str(workers): backlog}
        rate = {k: b["samples_processed"] / (b["active_seconds"] or float("nan")) for k, b in by.items()}
        aucs = {k: _live_aucs(b) for k, b in by.items()}
        report["train_by_workers"] = {k: {"train_samples_per_s": round(rate[k], 1), "auc_final": aucs[k],
                                          "active_seconds": by[k]["active_seconds"],
                                          "cpu_seconds": [r["cpu_seconds"] for r in by[k].get("ranks", [by[k]])]}
                                      for k in by}
        report["speedup_vs_1_worker"] = round(rate[str(workers)] / rate["1"], 3)
        # the runs' means (one run each by default): the judged difference
        mean = {k: report["backlog_runs"][k]["auc_final_mean"] for k in ("1", str(workers))}
        delta = {t: round(mean[str(workers)][t] - mean["1"][t], 4) for t in MAIN_TASKS}
        report["auc_vs_1_worker"] = delta
        report["auc_within_0_005_of_1_worker"] = all(abs(d) <= 0.005 for d in delta.values())
    from bench import train as bench_train

    # like with like: the trainer's batch and torch threads
    bench_train.main(["--json", str(run.work / "bench_train.json"), "--steps", "80", "--score-calls", "500",
                      "--batch", str(args.batch), "--threads", str(run.settings.trainer_threads),
                      "--rows", str(run.settings.trainer_embedding_rows)])
    offline = json.loads((run.work / "bench_train.json").read_text())["train_samples_per_s"]
    report["offline_train_batch"] = args.batch
    report["offline_train_threads"] = run.settings.trainer_threads
    active = backlog["active_seconds"] or float("nan")
    sps = backlog["samples_processed"] / active
    rps = backlog["trained_rows"] / active
    report.update(
        train_samples_per_s=round(sps, 1),
        train_rows_per_s=round(rps, 1),
        offline_train_samples_per_s=offline,
        train_vs_offline=round(sps / offline, 3),
        train_rows_vs_offline=round(rps / offline, 3),
        train_backlog={k: backlog[k] for k in ("mode", "samples_processed", "trained_rows", "active_seconds",
                                               "lingered_seconds", "busy_seconds")},
    )
    report["auc_final_backlog"] = _live_aucs(backlog)



def _quality(run: Run, collected: list[Sample], report: dict[str, Any]) -> None:
    """4. Quality: identical samples through the trainer core, per mode."""
    args = run.args
    samples = collected
    fields = tuple(run.sim.field_names)
    cutoff = EPOCH_MS + args.frozen_days * DAY_MS
    event_ms = {s.impression_id: s.event_time_ms for s in samples}
    last_day_ms = EPOCH_MS + args.days * DAY_MS
    t_q = time.monotonic()
    kw = {"batch": args.batch, "lr": args.lr, "stabilisers": stabilisers_from(run.settings)}
    pairs = {
        "incremental": _replay(samples, fields, run.settings, run.settings.trainer_mode, **kw),
        "frozen": _replay(samples, fields, run.settings, run.settings.trainer_mode, cutoff, **kw),
        "final_only": _replay(samples, fields, run.settings, "final-only", **kw),
        "oracle_learner": _replay(samples, fields, run.settings, "final-only",
                                  batches=_oracle_batches(samples, args.batch), **kw),
    }
    pairs["fnw"] = (pairs["incremental"] if run.settings.trainer_mode == "fnw"
                    else _replay(samples, fields, run.settings, "fnw", **kw))
    common = set.intersection(*(set(p) for p in pairs.values()))
    ids = sorted(i for i in common if cutoff <= event_ms[i] < last_day_ms)
    report["auc_final"] = {mode: _aucs(p, ids) for mode, p in pairs.items()}
    if "live_trainer" in report:  # the live trainers' own figure (every final since the start, all ranks)
        report["auc_final"]["live"] = report["live_trainer"]["auc_lifetime"]
    truth = {r.impression_id: r for r in run.stream.truth}
    ys = np.array([truth[i].labels for i in ids if i in truth])
    ps = np.array([truth[i].p_true for i in ids if i in truth])
    report["auc_final"]["simulator_truth"] = {t: round(auc(ys[:, k], ps[:, k]), 4)
                                              for k, t in enumerate(TASKS[:N_TASKS])}
    report["auc_eval_impressions"] = len(ids)
    report["incremental_training_mode"] = run.settings.trainer_mode
    a = report["auc_final"]
    best = max(("fnw", "final_only"), key=lambda m: sum(a[m][t] for t in MAIN_TASKS))
    report["best_delayed_feedback_mode"] = best
    report["gap_closed_share"] = {
        t: round((a[best][t] - a["final_only"][t]) / (a["oracle_learner"][t] - a["final_only"][t]), 3)
        if a["oracle_learner"][t] != a["final_only"][t] else None
        for t in MAIN_TASKS
    }
    report["fnw_gap_closed_share"] = {
        t: round((a["fnw"][t] - a["final_only"][t]) / (a["oracle_learner"][t] - a["final_only"][t]), 3)
        if a["oracle_learner"][t] != a["final_only"][t] else None
        for t in MAIN_TASKS
    }
    report["incremental_beats_frozen"] = {t: a["incremental"][t] > a["frozen"][t] for t in MAIN_TASKS}
    report["replay_s"] = round(time.monotonic() - t_q, 1)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.days < 20:
        print("note: the issue asks for at least 20 simulated days", file=sys.stderr)
    t_start = time.monotonic()
    run = _setup(args)
    report: dict[str, Any] = {"days": args.days, "impressions_per_day": run.per_day, "drift": args.drift,
                              "speedup": args.speedup, "batch": args.batch, "lr": args.lr,
                              "frozen_days": args.frozen_days, "seed": args.seed,
                              "trainer_workers": args.trainer_workers}
    try:
        collected, feats = _live(run, report)
        _latency(run, feats, report)
        _throughput(run, report)
        _quality(run, collected, report)
    finally:
        run.procs.stop_all()
        run.broker.stop()
    report.update(
        wall_s=round(time.monotonic() - t_start, 1),
        device=str(pick_device(args.device or run.settings.trainer_device)),
        machine=platform.machine(),
        cpus=os.cpu_count(),
        torch=torch.__version__,
    )
    print(write_json(args.json, report), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
