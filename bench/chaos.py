"""``aitm-stream bench chaos``: kill -9 the joiner, trainer and scorer at random while a faulty
stream flows, restart them, and check that no final label is lost, changed or duplicated, that
the trainer resumed from its checkpoints and that every impression was scored.

The answer key is the simulator's, computed from the records as delivered with the documented
rules (``simulators/rules.py``), never from the joiner: each impression's final labels, and every
record to dead-letter with its reason. ``--delivery`` picks how the partners deliver (real time,
hourly and daily batch files, lagging sources); ``--cpu-hog`` runs a busy process beside the
pipeline for the whole run (a loaded machine). Figures (JSON): ``labels_lost``, ``labels_wrong``,
``duplicate_finals`` (impressions whose finals disagree), ``repeated_finals`` (identical
re-emissions: the at-least-once price after a kill -9, deduped downstream on (impression_id,
seq); each must follow a joiner kill), ``dead_letters_missing`` / ``dead_letters_unexplained``
(per reason too) and ``final_delay_s`` (how far, in event time, the topic a final waited for had
got past the funnel's last possible event when the final went out: p50 / p99, and per lane).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from bench.chaos_checks import (
    Ledger,
    expectations,
    final_delays,
    realtime_final_delays,
    repeats_after_kills,
)
from bench.report import write_json
from bench.supervisor import Supervisor, read_procfile, wait_http
from bench.topic_reader import TopicTail
from simulators.delivery import PROFILES
from simulators.faults import FaultConfig, Record, SimulatedStream, missing_dead_letters
from simulators.funnel import FunnelSimulator, SimConfig
from simulators.kafka_sink import Background, produce
from stream.kafka.broker import ensure_topics, free_port
from stream.ops.command import command_parser
from stream.ops.settings import Settings

VICTIMS = ("joiner", "trainer", "scorer")
PORTS = (
    "EMBEDDED_BROKER_PORT", "METRICS_PORT_BROKER", "METRICS_PORT_JOINER", "METRICS_PORT_TRAINER",
    "METRICS_PORT_SCORER", "SCORER_HTTP_PORT",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("bench chaos")
    p.add_argument("--json", type=Path, default=Path("reports/bench_chaos.json"))
    p.add_argument("--days", type=int, default=10)
    p.add_argument("--impressions-per-day", type=int, default=20_000)
    p.add_argument("--tail-days", type=int, default=21,
                   help="low-rate days so every main day matures (activations: 14 d + 2 d allowed lateness)")
    p.add_argument("--fault-rate", type=float, default=0.005)
    p.add_argument("--kills", type=int, default=5, help="kills of each of joiner, trainer, scorer")
    p.add_argument("--stream-seconds", type=float, default=240.0, help="wall time to spread the stream over")
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--delivery", default="realtime", choices=PROFILES, help="how the partners deliver (simulator)")
    p.add_argument("--cpu-hog", action="store_true", help="a busy process beside the pipeline for the whole run")
    p.add_argument("--idle-timeout-ms", type=int, default=2000,
                   help="the joiner's JOINER_IDLE_TIMEOUT_MS (wall time; the stream runs hours a second)")
    p.add_argument("--data-dir", type=Path, default=Path(".data/chaos"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the supervisor stops every child it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kept = args.json.parent / "chaos-logs" / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-seed{args.seed}-{args.delivery}"
    try:
        result = run(args)
    finally:  # each run's logs kept beside its figures (the next run starts with an empty data dir)
        keep_logs(args.data_dir / "logs", kept)
    result["logs_kept_in"] = str(kept)
    write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    checks = ("labels_lost", "labels_wrong", "duplicate_finals", "dead_letters_missing",
              "dead_letters_unexplained", "repeated_finals_without_a_kill", "impressions_unscored")  # fmt: skip
    return 0 if all(result[k] == 0 for k in checks) else 1


def keep_logs(logs: Path, kept: Path) -> None:
    """Copy a run's logs to ``kept`` (a failing run can be read after the next has started)."""
    if logs.is_dir():
        shutil.copytree(logs, kept, dirs_exist_ok=True)
        print(f"logs of this run kept in {kept}", flush=True)


# the log line each victim writes once it is at work again after a start: a kill before it (a
# loaded machine's slow start, a trainer still waiting for the writer lease) would test nothing
# of what its restart must do (resume from a checkpoint, recover the join state)
READY_LINE = {"trainer": "trainer: mode", "joiner": "", "scorer": ""}
READY_WAIT_S = 60.0


def _ready_lines(sup: Supervisor, name: str) -> int:
    line = READY_LINE.get(name, "")
    log = sup.log_dir / f"{name}.log"
    if not line or not log.exists():
        return 0
    return log.read_text(errors="replace").count(line)


def _wait_ready(sup: Supervisor, name: str, before: int) -> None:
    """Until the restarted ``name`` is at work (its ready line logged once more; its /metrics
    answering for the others), or READY_WAIT_S."""
    deadline = time.monotonic() + READY_WAIT_S
    port = sup.env.get(f"METRICS_PORT_{name.upper()}")
    while time.monotonic() < deadline and sup.alive(name):
        if READY_LINE.get(name):
            if _ready_lines(sup, name) > before:
                return
        elif port is not None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).close()
                return
            except OSError:
                pass
        time.sleep(0.2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    if args.data_dir.exists():
        shutil.rmtree(args.data_dir)
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update({k: str(free_port()) for k in PORTS})
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{env['EMBEDDED_BROKER_PORT']}",
        "DATA_DIR": str(args.data_dir.resolve()),
        "JOINER_RECOVERY_CONSISTENCY_CHECK": "false",
        "JOINER_MAX_FUTURE_MS": "0",  # simulated time runs ahead of the wall clock
        # 1 s of wall time is hours of simulated time here: the default 30 s idle timeout would
        # be days; 2 s is about 6 simulated hours at the default pace
        "JOINER_IDLE_TIMEOUT_MS": str(args.idle_timeout_ms),
        "METRICS_PORT_SIMULATOR": str(free_port()),
        # training checkpoints every ~1.5 versions instead of every minute (a kill comes every few
        # seconds here): a killed trainer resumes from a checkpoint older than its last version
        "TRAINER_TRAINING_CHECKPOINT_INTERVAL_MS": "4000",
    })  # fmt: skip
    settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    procfile = read_procfile()
    sim = FunnelSimulator(SimConfig(seed=args.seed, impressions_per_day=args.impressions_per_day))
    stream = SimulatedStream(
        sim, args.days, FaultConfig.uniform(args.fault_rate), tail_days=args.tail_days,
        delivery=args.delivery, partitions=settings.event_partitions,
    )  # fmt: skip
    total_days = args.days + args.tail_days
    speedup = total_days * 86_400 / args.stream_seconds
    kills: Counter[str] = Counter()
    joiner_kills_ms: list[int] = []
    load = {"at_start": os.getloadavg()[0]}
    t0 = time.monotonic()
    with Supervisor(env, args.data_dir / "logs") as sup:
        if args.cpu_hog:  # one core kept busy the whole run, in its own process group
            sup.start("cpu_hog", [sys.executable, "-c", "while True: pass"])
        sup.start("broker", procfile["broker"], {"KAFKA_BOOTSTRAP_SERVERS": ""})
        wait_http(f"http://127.0.0.1:{env['METRICS_PORT_BROKER']}/metrics", 30, lambda: sup.alive("broker"))
        ensure_topics(settings.kafka_python_config(), settings.topic_specs())
        for name in VICTIMS:
            sup.start(name, procfile[name])
        for name in VICTIMS:
            url = f"http://127.0.0.1:{env[f'METRICS_PORT_{name.upper()}']}/metrics"
            wait_http(url, 90, partial(sup.alive, name))
        ledger = Ledger(
            {"samples": settings.topic_samples, "scores": settings.topic_scores},
            tuple(settings.event_topics().values()),
        )
        tail = TopicTail(
            settings, [settings.topic_samples, settings.topic_scores, settings.topic_dead_letters], ledger
        ).start()
        sent: dict[str, int] = {}
        delivered: list[Record] = []

        def kept(records: Iterable[Record]) -> Iterator[Record]:
            for rec in records:
                delivered.append(rec)
                yield rec

        producer = Background(lambda: sent.update(produce(kept(stream), settings, speedup=speedup)))
        producer.start()
        # kills spread over the stream: each victim `kills` times, in a shuffled order
        schedule = [v for v in VICTIMS for _ in range(args.kills)]
        rng.shuffle(schedule)
        gap = args.stream_seconds * 0.85 / (len(schedule) + 1)
        for victim in schedule:
            time.sleep(gap * rng.uniform(0.6, 1.4))
            if victim == "joiner":
                joiner_kills_ms.append(int(time.time() * 1000))
            sup.kill(victim)
            kills[victim] += 1
            time.sleep(rng.uniform(0.5, 2.0))
            ready_before = _ready_lines(sup, victim)
            sup.start(victim, procfile[victim])
            _wait_ready(sup, victim, ready_before)
        producer.result()  # every record delivered (NotDelivered otherwise)
        expected = expectations(stream)
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline:
            done_finals = sum(1 for i in expected["labelled"] if i in ledger.finals)
            done_scores = sum(1 for i in expected["scorable"] if i in ledger.scored)
            done_dead = not missing_dead_letters(expected["dead_required"], ledger.dead_keys())
            if done_finals == len(expected["labelled"]) and done_scores == len(expected["scorable"]) and done_dead:
                break
            if tail.idle_for() > 60:
                break
            for name in VICTIMS:
                if not sup.alive(name):  # a crash not of our making: restart, and count it
                    kills[f"{name}_crashed"] += 1
                    if name == "joiner":
                        joiner_kills_ms.append(int(time.time() * 1000))
                    sup.start(name, procfile[name])
            time.sleep(2)
        time.sleep(3)
        tail.stop()
        load["at_end"] = os.getloadavg()[0]
        restarts = {k: v for k, v in sup.restarts.items() if k in VICTIMS}
        trainer_log = (args.data_dir / "logs" / "trainer.log").read_text(errors="replace")
    result = summarise(
        args, stream, ledger, expected, kills, restarts, trainer_log, sent, time.monotonic() - t0
    )
    result.update(repeats_after_kills(ledger, joiner_kills_ms))
    result["final_delay_s"] = final_delays(stream, ledger, settings)
    result["final_delay_realtime_s"] = realtime_final_delays(delivered, stream, settings)
    result["delivery"], result["cpu_hog"], result["load_1min"] = args.delivery, args.cpu_hog, load
    result["simulated_s_per_wall_s"] = round(speedup)
    result["joiner_idle_timeout_ms"] = args.idle_timeout_ms
    return result


def summarise(
    args: argparse.Namespace, stream: SimulatedStream, ledger: Ledger, expected: dict[str, Any],
    kills: Counter[str], restarts: dict[str, int], trainer_log: str, sent: dict[str, int], wall_s: float,
) -> dict[str, Any]:  # fmt: skip
    labelled: dict[str, tuple[int, ...]] = expected["labelled"]
    lost = [i for i in labelled if i not in ledger.finals]
    wrong = [i for i, y in labelled.items() if i in ledger.finals and ledger.finals[i] != {tuple(y)}]
    conflicting = [i for i, ys in ledger.finals.items() if len(ys) > 1]
    never = {t.impression_id for t in stream.truth if t.final_labels is None}
    invented = [i for i in ledger.finals if i in never]
    unscored = [i for i in expected["scorable"] if i not in ledger.scored]
    reasons = Counter(d["reason"] for d in ledger.dead)
    seen = ledger.dead_keys()
    missing_dead = missing_dead_letters(expected["dead_required"], seen)
    unexplained_dead = sorted(seen - expected["dead"])
    resumes = len(re.findall(r"resumed from model version", trainer_log))
    cold = len(re.findall(r"cold start", trainer_log))
    truth = {t.impression_id: t for t in stream.truth}
    return {
        "impressions": sum(1 for t in stream.truth if not t.tail),
        "tail_impressions": sum(1 for t in stream.truth if t.tail),
        "records": sum(sent.values()),
        "faults_injected": dict(Counter(f.kind for f in stream.faults)),
        "kills": dict(kills),
        "restarts": restarts,
        "trainer_resumed_from_checkpoint": resumes,
        "trainer_cold_starts": cold,
        "dead_letters": dict(reasons),
        "dead_letters_expected": dict(Counter(d.reason for d in stream.dead_letters)),
        "dead_letters_missing": len(missing_dead),
        "dead_letters_missing_by_reason": dict(Counter(r for _, _, r in missing_dead)),
        "dead_letters_unexplained": len(unexplained_dead),
        "dead_letters_unexplained_by_reason": dict(Counter(r for _, _, r in unexplained_dead)),
        "labels_checked": len(labelled),
        "labels_lost": len(lost),
        "labels_wrong": len(wrong),
        "duplicate_finals": len(conflicting),
        "finals_without_impression": len(invented),
        "final_records": ledger.final_records,
        "final_records_replayed": ledger.final_records - len(ledger.finals),
        "impressions_scored": len(ledger.scored),
        "impressions_unscored": len(unscored),
        "scores_records": sum(ledger.scored.values()),
        "scores_rescored": sum(ledger.scored.values()) - len(ledger.scored),
        "impressions_delivered_twice": len(
            {f.impression_id for f in stream.faults if f.kind == "duplicate" and f.step == "impression"}
        ),
        "wall_s": round(wall_s, 1),
        "examples": {
            "lost": [(i, list(labelled[i]), truth[i].final_lane) for i in lost[:5]],
            "wrong": [
                {
                    "impression_id": i,
                    "truth": list(labelled[i]),
                    "finals": sorted(map(list, ledger.finals[i])),
                    "faults": list(truth[i].faults),
                    "dead_letters": [
                        (d["source_topic"], d["reason"], d["detail"])
                        for d in ledger.dead
                        if d.get("key") == i
                    ],
                }
                for i in wrong[:5]
            ],
            "unscored": unscored[:5],
            "missing_dead": [
                {
                    "dead_letter": list(m),
                    "faults": list(truth[m[0]].faults) if m[0] in truth else None,
                    "finals": sorted(map(list, ledger.finals.get(m[0], ()))),
                    "dead_letters": [(d["source_topic"], d["reason"], d["detail"]) for d in ledger.dead
                                     if d.get("key") == m[0]],
                }
                for m in missing_dead[:5]
            ],
            "unexplained_dead": unexplained_dead[:5],
        },
    }


if __name__ == "__main__":
    sys.exit(main())
