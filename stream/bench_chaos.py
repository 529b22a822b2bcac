"""``aitm-stream bench chaos``: kill -9 the joiner, trainer and scorer at random while a faulty
stream flows, restart them, and check that no final label is lost, changed or duplicated, that
the trainer resumed from its checkpoints and that every impression was scored.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path
from typing import Any

from simulators.faults import FaultConfig, SimulatedStream
from simulators.funnel import FunnelSimulator, SimConfig
from simulators.kafka_sink import produce
from stream.broker import ensure_topics, free_port
from stream.samples import parse_sample
from stream.settings import Settings
from stream.supervisor import Supervisor, read_procfile, wait_http
from stream.topic_reader import TopicTail

VICTIMS = ("joiner", "trainer", "scorer")
PORTS = (
    "EMBEDDED_BROKER_PORT", "METRICS_PORT_BROKER", "METRICS_PORT_JOINER", "METRICS_PORT_TRAINER",
    "METRICS_PORT_SCORER", "SCORER_HTTP_PORT",
)  # fmt: skip


class Ledger:
    """What came out of the pipeline, collected from the samples, scores and dead-letters topics."""

    def __init__(self, topics: dict[str, str]) -> None:
        self.topics = topics
        self.finals: dict[str, set[tuple[int, ...]]] = defaultdict(set)
        self.final_records = 0
        self.sampled: set[str] = set()
        self.scored: Counter[str] = Counter()
        self.dead: list[dict[str, Any]] = []

    def __call__(self, rec: Any) -> None:
        if rec.topic == self.topics["samples"]:
            s = parse_sample(rec.value)
            self.sampled.add(s.impression_id)
            if s.kind == "final":
                self.finals[s.impression_id].add(tuple(s.labels))
                self.final_records += 1
        elif rec.topic == self.topics["scores"]:
            self.scored[json.loads(rec.value)["impression_id"]] += 1
        else:
            self.dead.append(json.loads(rec.value))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aitm-stream bench chaos", description=__doc__)
    p.add_argument("--json", type=Path, default=Path("reports/bench_chaos.json"))
    p.add_argument("--days", type=int, default=10)
    p.add_argument("--impressions-per-day", type=int, default=20_000)
    p.add_argument("--tail-days", type=int, default=19, help="low-rate days so every main day matures")
    p.add_argument("--fault-rate", type=float, default=0.005)
    p.add_argument("--kills", type=int, default=5, help="kills of each of joiner, trainer, scorer")
    p.add_argument("--stream-seconds", type=float, default=240.0, help="wall time to spread the stream over")
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--data-dir", type=Path, default=Path(".data/chaos"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the supervisor stops every child it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    ok = result["labels_lost"] == 0 and result["labels_wrong"] == 0 and result["duplicate_finals"] == 0
    return 0 if ok and result["impressions_unscored"] == 0 else 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    import os

    rng = random.Random(args.seed)
    if args.data_dir.exists():
        shutil.rmtree(args.data_dir)
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update({k: str(free_port()) for k in PORTS})
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{env['EMBEDDED_BROKER_PORT']}",
        "DATA_DIR": str(args.data_dir.resolve()),
        "JOINER_RECOVERY_CONSISTENCY_CHECK": "false",
        "METRICS_PORT_SIMULATOR": str(free_port()),
    })  # fmt: skip
    settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    procfile = read_procfile()
    sim = FunnelSimulator(SimConfig(seed=args.seed, impressions_per_day=args.impressions_per_day))
    stream = SimulatedStream(sim, args.days, FaultConfig.uniform(args.fault_rate), tail_days=args.tail_days)
    total_days = args.days + args.tail_days
    speedup = total_days * 86_400 / args.stream_seconds
    kills: Counter[str] = Counter()
    t0 = time.monotonic()
    with Supervisor(env, args.data_dir / "logs") as sup:
        sup.start("broker", procfile["broker"], {"KAFKA_BOOTSTRAP_SERVERS": ""})
        wait_http(f"http://127.0.0.1:{env['METRICS_PORT_BROKER']}/metrics", 30, lambda: sup.alive("broker"))
        ensure_topics(settings.kafka_python_config(), settings.topic_specs())
        for name in VICTIMS:
            sup.start(name, procfile[name])
        for name in VICTIMS:
            url = f"http://127.0.0.1:{env[f'METRICS_PORT_{name.upper()}']}/metrics"
            wait_http(url, 90, partial(sup.alive, name))
        ledger = Ledger({"samples": settings.topic_samples, "scores": settings.topic_scores})
        tail = TopicTail(
            settings, [settings.topic_samples, settings.topic_scores, settings.topic_dead_letters], ledger
        ).start()
        sent: dict[str, int] = {}
        producer = threading.Thread(
            target=lambda: sent.update(produce(stream, settings, speedup=speedup)),
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
            if done_finals == len(expected["labelled"]) and done_scores == len(expected["scorable"]):
                break
            if tail.idle_for() > 60:
                break
            for name in VICTIMS:
                if not sup.alive(name):  # a crash not of our making: restart, and count it
                    kills[f"{name}_crashed"] += 1
                    sup.start(name, procfile[name])
            time.sleep(2)
        time.sleep(3)
        tail.stop()
        restarts = dict(sup.restarts)
        trainer_log = (args.data_dir / "logs" / "trainer.log").read_text(errors="replace")
    return summarise(
        args, stream, ledger, expected, kills, restarts, trainer_log, sent, time.monotonic() - t0
    )


def expectations(stream: SimulatedStream) -> dict[str, Any]:
    """Impressions whose final labels must match the truth, and impressions that must be scored."""
    labelled = {t.impression_id: t.labels for t in stream.truth if not t.corrupted and not t.tail}
    malformed_impressions = {
        f.impression_id for f in stream.faults if f.kind == "malformed" and f.step == "impression"
    }
    dropped_impressions = {
        f.impression_id for f in stream.faults if f.kind == "illegal" and f.step == "click"
    }
    scorable = {t.impression_id for t in stream.truth} - malformed_impressions - dropped_impressions
    return {"labelled": labelled, "scorable": scorable}


def summarise(
    args: argparse.Namespace, stream: SimulatedStream, ledger: Ledger, expected: dict[str, Any],
    kills: Counter[str], restarts: dict[str, int], trainer_log: str, sent: dict[str, int], wall_s: float,
) -> dict[str, Any]:  # fmt: skip
    labelled: dict[str, tuple[int, ...]] = expected["labelled"]
    lost = [i for i in labelled if i not in ledger.finals]
    wrong = [i for i, y in labelled.items() if i in ledger.finals and ledger.finals[i] != {tuple(y)}]
    conflicting = [i for i, ys in ledger.finals.items() if len(ys) > 1]
    unscored = [i for i in expected["scorable"] if i not in ledger.scored]
    reasons = Counter(d["reason"] for d in ledger.dead)
    dead_keys = {(d.get("key"), d["reason"]) for d in ledger.dead}
    missing_dead = [
        f
        for f in stream.faults
        if f.expected_reason is not None and (f.impression_id, f.expected_reason) not in dead_keys
    ]
    resumes = len(re.findall(r"resumed from model version", trainer_log))
    cold = len(re.findall(r"cold start", trainer_log))
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
        "dead_letters_missing": len(missing_dead),
        "labels_checked": len(labelled),
        "labels_lost": len(lost),
        "labels_wrong": len(wrong),
        "duplicate_finals": len(conflicting),
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
            "lost": lost[:5],
            "wrong": [
                {
                    "impression_id": i,
                    "truth": list(labelled[i]),
                    "finals": sorted(map(list, ledger.finals[i])),
                    "dead_letters": [
                        (d["source_topic"], d["reason"], d["detail"])
                        for d in ledger.dead
                        if d.get("key") == i
                    ],
                }
                for i in wrong[:5]
            ],
            "unscored": unscored[:5],
            "missing_dead": [f.impression_id for f in missing_dead[:5]],
        },
    }


if __name__ == "__main__":
    sys.exit(main())
