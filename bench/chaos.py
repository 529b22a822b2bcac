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
import itertools
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.supervisor import Supervisor, read_procfile, wait_http
from bench.topic_reader import TopicTail
from simulators.delivery import PROFILES
from simulators.faults import FaultConfig, Record, SimulatedStream
from simulators.funnel import FunnelSimulator, SimConfig
from simulators.kafka_sink import produce
from stream.contract.events import STEPS
from stream.contract.samples import parse_sample
from stream.kafka.broker import ensure_topics, free_port
from stream.ops.settings import Settings

VICTIMS = ("joiner", "trainer", "scorer")
LANES = ("activated", "clicks", "applications", "approvals", "activations")  # what each final waits for
# a final emitted again must have been first emitted this long (wall) before a kill of the joiner
# or less: its flush was in flight, its acks not yet recorded (generous for a loaded machine)
REPEAT_WINDOW_S = 15.0
PORTS = (
    "EMBEDDED_BROKER_PORT", "METRICS_PORT_BROKER", "METRICS_PORT_JOINER", "METRICS_PORT_TRAINER",
    "METRICS_PORT_SCORER", "SCORER_HTTP_PORT",
)  # fmt: skip


class Ledger:
    """What came out of the pipeline, collected from the samples, scores and dead-letters topics."""

    def __init__(self, topics: dict[str, str], event_topics: tuple[str, ...] = ()) -> None:
        self.topics = topics
        self.step_of = dict(zip(event_topics, STEPS, strict=True)) if event_topics else {}
        self.finals: dict[str, set[tuple[int, ...]]] = defaultdict(set)
        self.final_records = 0
        self.final_ms: dict[str, list[int]] = defaultdict(list)  # when each final record was produced
        self.sampled: set[str] = set()
        self.scored: Counter[str] = Counter()
        self.dead: list[dict[str, Any]] = []
        self.final_wm: dict[str, tuple[int, int]] = {}  # (producer time, lane watermark) of the first final

    def __call__(self, rec: Any) -> None:
        if rec.topic == self.topics["samples"]:
            s = parse_sample(rec.value)
            self.sampled.add(s.impression_id)
            if s.kind == "final":
                self.final_ms[s.impression_id].append(rec.timestamp)
                self.finals[s.impression_id].add(tuple(s.labels))
                first = self.final_wm.get(s.impression_id)
                if first is None or rec.timestamp < first[0]:
                    self.final_wm[s.impression_id] = (rec.timestamp, s.watermark_ms)
                self.final_records += 1
        elif rec.topic == self.topics["scores"]:
            self.scored[json.loads(rec.value)["impression_id"]] += 1
        else:
            self.dead.append(json.loads(rec.value))

    def dead_keys(self) -> set[tuple[str, str, str]]:
        """(impression id, step, reason) of every dead letter."""
        return {(d.get("key") or "", self.step_of.get(d["source_topic"], d["source_topic"]), d["reason"]) for d in self.dead}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aitm-stream bench chaos", description=__doc__)
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
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    checks = ("labels_lost", "labels_wrong", "duplicate_finals", "dead_letters_missing",
              "dead_letters_unexplained", "repeated_finals_without_a_kill", "impressions_unscored")  # fmt: skip
    return 0 if all(result[k] == 0 for k in checks) else 1


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

        producer = threading.Thread(
            target=lambda: sent.update(produce(kept(stream), settings, speedup=speedup)),
            name="producer",
            daemon=True,
        )
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
            sup.start(victim, procfile[victim])
        producer.join()
        expected = expectations(stream)
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline:
            done_finals = sum(1 for i in expected["labelled"] if i in ledger.finals)
            done_scores = sum(1 for i in expected["scorable"] if i in ledger.scored)
            done_dead = expected["dead_required"] <= ledger.dead_keys()
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


def expectations(stream: SimulatedStream) -> dict[str, Any]:
    """From the simulator's answer key: impressions whose final labels must be out by the end
    (with those labels), every dead letter it expects, and impressions that must be scored."""
    labelled = {t.impression_id: t.final_labels for t in stream.truth if t.final_required}
    malformed_impressions = {
        f.impression_id for f in stream.faults if f.kind == "malformed" and f.step == "impression"
    }
    dropped_impressions = {
        f.impression_id for f in stream.faults if f.kind == "illegal" and f.step == "click"
    }
    scorable = {t.impression_id for t in stream.truth} - malformed_impressions - dropped_impressions
    dead = {(d.impression_id, d.step, d.reason) for d in stream.dead_letters}
    dead_required = {(d.impression_id, d.step, d.reason) for d in stream.dead_letters if d.required}
    return {"labelled": labelled, "scorable": scorable, "dead": dead, "dead_required": dead_required}


def repeats_after_kills(ledger: Ledger, joiner_kills_ms: list[int]) -> dict[str, Any]:
    """Repeated finals (identical re-emissions), and those whose first copy was not produced in the
    ``REPEAT_WINDOW_S`` before a kill of the joiner (a repeat without a crash to explain it)."""
    window = REPEAT_WINDOW_S * 1000
    repeated = unexplained = 0
    for times in list(ledger.final_ms.values()):
        for before, again in itertools.pairwise(sorted(times)):
            repeated += 1
            if not any(before <= k <= min(again, before + window) for k in joiner_kills_ms):
                unexplained += 1
    return {
        "repeated_finals": repeated,
        "repeated_finals_without_a_kill": unexplained,
        "repeat_window_s": REPEAT_WINDOW_S,
    }


def final_delays(stream: SimulatedStream, ledger: Ledger, settings: Settings) -> dict[str, Any]:
    """For each final: how far the topic it waited for had got past the funnel's final time
    when the final went out - the final's lane watermark plus that lane's allowed lateness, minus
    the final time (for an activated funnel, final at once: how far the impressions had got past
    the activation). Event time, so it is what the rules cost (the allowed lateness, a sparse or
    idle topic, a batch file, the sweep interval) and not this run's reading order of the topics."""
    truth = {t.impression_id: t for t in stream.truth}
    lateness = settings.joiner_lateness_ms()
    by_lane: dict[str, list[float]] = defaultdict(list)
    every: list[float] = []
    for iid, (_, wm) in list(ledger.final_wm.items()):
        row = truth.get(iid)
        if row is None or row.final_at_ms is None or row.final_lane is None or not row.final_required:
            continue
        delay = (wm + lateness[row.final_lane] - row.final_at_ms) / 1000.0
        every.append(delay)
        by_lane[LANES[row.final_lane]].append(delay)

    def q(xs: list[float]) -> dict[str, float]:
        a = np.asarray(xs)
        return {"p50": round(float(np.percentile(a, 50)), 1), "p99": round(float(np.percentile(a, 99)), 1),
                "n": len(xs)}  # fmt: skip

    return {**q(every), "by_lane": {lane: q(xs) for lane, xs in sorted(by_lane.items())}} if every else {}


def realtime_final_delays(records: list[Record], stream: SimulatedStream, settings: Settings) -> dict[str, Any]:
    """``final_delay_s`` at real-time pace: the same records through the same ``FunnelJoin``, in
    process, the clock following their delivery times (wall time = event time, sweeps every
    ``JOINER_SWEEP_INTERVAL_MS``, idle after ``JOINER_IDLE_TIMEOUT_MS`` as configured for
    production). The chaos run itself goes hours of simulated time a second, where one sweep
    interval or a catch-up after a kill is hours of event time."""
    from simulators.faults import kafka_partition
    from stream.join.app import funnel_config, join_topics
    from stream.join.driver import FunnelJoin, Output
    from stream.join.store import InMemoryStore
    from stream.ops.clock import FakeClock

    prod = Settings(kafka_bootstrap_servers=settings.kafka_bootstrap_servers)  # production defaults
    topics = join_topics(prod)
    by_step = dict(zip(STEPS, topics.events, strict=True))
    stores: dict[int, InMemoryStore] = {}
    clock = FakeClock(records[0].deliver_ms if records else 0)
    join = FunnelJoin(
        funnel_config(prod), topics, lambda p: stores.setdefault(p, InMemoryStore()), clock,
        lateness_ms=prod.joiner_lateness_ms(), sweep_interval_s=prod.joiner_sweep_interval_ms / 1000,
        idle_timeout_s=prod.joiner_idle_timeout_ms / 1000, max_future_ms=0,
    )  # fmt: skip
    parts = prod.event_partitions
    final_wm: dict[str, int] = {}

    def collect(out: list[Output]) -> None:
        for o in out:
            if o.topic == topics.samples and b'"kind":"final"' in o.value:
                s = parse_sample(o.value)
                if s.kind == "final":
                    final_wm.setdefault(s.impression_id, s.watermark_ms)

    for p in range(parts):
        for k in range(len(STEPS)):
            join.caught_up(p, k)  # read as delivered: every topic at its end (records say so too)

    def tick(partitions: Iterable[int]) -> None:
        for p in partitions:
            if join.sweep_due(p):
                out: list[Output] = []
                join.sweep(p, out)
                join.commit_sweep(p)
                collect(out)

    every = range(parts)
    last_all = clock.now_ms()
    for rec in records:
        if rec.deliver_ms > clock.now_ms():
            clock.advance(rec.deliver_ms - clock.now_ms())
        out: list[Output] = []
        p = kafka_partition(rec.key, parts)
        join.on_record(by_step[rec.step], p, rec.key, rec.value, False, out)
        collect(out)
        if clock.now_ms() - last_all >= 10_000:  # quiet partitions too (their topics go idle)
            last_all = clock.now_ms()
            tick(every)
        else:
            tick((p,))
    for _ in range(120):  # the stream has ended: two minutes, every topic goes idle
        clock.advance(1000)
        tick(every)
    ledger = Ledger({"samples": topics.samples, "scores": ""})
    ledger.final_wm = {iid: (0, wm) for iid, wm in final_wm.items()}
    return final_delays(stream, ledger, prod)


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
    missing_dead = sorted(expected["dead_required"] - seen)
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
        "dead_letters_expected": dict(Counter(r for _, _, r in expected["dead"])),
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
            "missing_dead": missing_dead[:5],
            "unexplained_dead": unexplained_dead[:5],
        },
    }


if __name__ == "__main__":
    sys.exit(main())
