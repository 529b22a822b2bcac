"""``aitm-stream bench rebalance``: two joiners share the partitions while one of them keeps leaving
(SIGTERM, or kill -9) and joining again, every few seconds of a faulty stream; then every final
label and dead letter is checked against the simulator's answer key.

Rebalances are where a joiner's ownership of a partition ends and begins: what it writes after it
left, what the next owner recovers, where that owner's lanes start. The two-joiner test
(``tests/e2e/test_scale_out.py``) makes one leave and one join; this makes a dozen of each, at
random moments (seeded), so a rare race has many chances to show. Figures (JSON):
``labels_lost`` (finals missing although their partition's impressions passed their due time;
``labels_not_due`` counts those the answer key wants but a sparse partition's clock never
reached), ``labels_wrong``, ``duplicate_finals``, ``dead_letters_missing`` /
``dead_letters_unexplained``, the ``cycles`` run (seconds after the stream began, and how), and
``examples`` of lost labels (impression, partition, whether a first sample came, its dead letters).
``--delivery`` picks how the partners deliver (real time, daily/hourly files, a lagging topic).
Exit code 1 when a check is not 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kafka.partitioner.default import murmur2

from bench.chaos_checks import Ledger, expectations
from bench.report import write_json
from bench.supervisor import Supervisor, read_procfile, wait_http
from bench.topic_reader import TopicTail
from simulators.delivery import PROFILES
from simulators.faults import FaultConfig, SimulatedStream, missing_dead_letters
from simulators.funnel import FunnelSimulator, SimConfig
from simulators.kafka_sink import Background, produce
from stream.kafka.broker import free_port
from stream.ops.command import command_parser
from stream.ops.settings import Settings

CHECKS = ("labels_lost", "labels_wrong", "duplicate_finals", "dead_letters_missing", "dead_letters_unexplained")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("bench rebalance")
    p.add_argument("--json", type=Path, default=Path("reports/bench_rebalance.json"))
    p.add_argument("--seed", type=int, default=41)
    p.add_argument("--impressions-per-day", type=int, default=4_000)
    p.add_argument("--tail-days", type=int, default=16, help="low-rate days after the main day, so its funnels mature")
    p.add_argument("--stream-seconds", type=float, default=60.0, help="wall time of the main day and its tail")
    p.add_argument("--fault-rate", type=float, default=0.005)
    p.add_argument("--delivery", default="realtime", choices=PROFILES, help="how the partners deliver (simulator)")
    p.add_argument("--every", type=float, nargs=2, default=(4.0, 9.0), metavar=("MIN_S", "MAX_S"),
                   help="seconds between two moves of the second joiner (uniform)")  # fmt: skip
    p.add_argument("--kill-share", type=float, default=1 / 3, help="share of leaves that are kill -9 (else SIGTERM)")
    p.add_argument("--drain-timeout", type=float, default=240.0)
    p.add_argument("--data-dir", type=Path, default=Path(".data/rebalance"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the supervisor stops its children
    result = run(args)
    write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0 if all(result[k] == 0 for k in CHECKS) else 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    if args.data_dir.exists():
        shutil.rmtree(args.data_dir)
    ports = ("EMBEDDED_BROKER_PORT", "METRICS_PORT_BROKER", "METRICS_PORT_JOINER")
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update({k: str(free_port()) for k in ports})
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{env['EMBEDDED_BROKER_PORT']}",
        "DATA_DIR": str((args.data_dir / "joiner-a").resolve()),
        "JOINER_RECOVERY_CONSISTENCY_CHECK": "false",  # the embedded broker (BROKER.md)
    })  # fmt: skip
    settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    sim = FunnelSimulator(SimConfig(seed=args.seed, impressions_per_day=args.impressions_per_day))
    stream = SimulatedStream(sim, 1, FaultConfig.uniform(args.fault_rate), tail_days=args.tail_days,
                             tail_impressions_per_day=100, delivery=args.delivery,
                             partitions=settings.event_partitions)  # fmt: skip
    procfile = read_procfile()
    joiner = [*procfile["joiner"], "--loglevel", "info"]
    second = {"DATA_DIR": str((args.data_dir / "joiner-b").resolve()), "METRICS_PORT_JOINER": str(free_port())}
    ledger = Ledger({"samples": settings.topic_samples, "scores": settings.topic_scores},
                    tuple(settings.event_topics().values()))  # fmt: skip
    cycles: list[tuple[float, str]] = []
    t_start = time.monotonic()
    with Supervisor(env, args.data_dir / "logs") as sup:
        sup.start("broker", procfile["broker"], {"KAFKA_BOOTSTRAP_SERVERS": ""})
        wait_http(f"http://127.0.0.1:{env['METRICS_PORT_BROKER']}/metrics", 30, lambda: sup.alive("broker"))
        sup.start("joiner", joiner)
        sup.start("joiner_b", joiner, second)
        wait_http(f"http://127.0.0.1:{env['METRICS_PORT_JOINER']}/metrics", 90, lambda: sup.alive("joiner"))
        time.sleep(8)  # both members take partitions
        tail = TopicTail(settings, [settings.topic_samples, settings.topic_dead_letters], ledger).start()
        speedup = (1 + args.tail_days) * 86_400 / args.stream_seconds
        producer = Background(produce, stream, settings, speedup=speedup)
        producer.start()
        t0 = time.monotonic()
        while producer.is_alive():
            time.sleep(rng.uniform(*args.every))
            if sup.alive("joiner_b"):
                how = "kill" if rng.random() < args.kill_share else "term"
                sup.kill("joiner_b") if how == "kill" else sup.stop("joiner_b")
            else:
                how = "start"
                sup.start("joiner_b", joiner, second)
            cycles.append((round(time.monotonic() - t0, 1), how))
            if not sup.alive("joiner"):
                raise RuntimeError(f"the first joiner died:\n{sup.tail('joiner')}")
        producer.result()  # every record delivered (NotDelivered otherwise)
        if not sup.alive("joiner_b"):
            sup.start("joiner_b", joiner, second)
        expected = expectations(stream)  # the answer key is complete once every record was made
        labelled: dict[str, tuple[int, ...]] = expected["labelled"]
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline and not (
            all(i in ledger.finals for i in labelled)
            and not missing_dead_letters(expected["dead_required"], ledger.dead_keys())
        ):
            time.sleep(2)
        time.sleep(3)
        tail.stop()
    result = summarise(stream, ledger, expected, cycles, time.monotonic() - t_start)
    result["seed"], result["delivery"] = args.seed, args.delivery
    return result


def summarise(
    stream: SimulatedStream, ledger: Ledger, expected: dict[str, Any], cycles: list[tuple[float, str]], wall_s: float
) -> dict[str, Any]:
    labelled: dict[str, tuple[int, ...]] = expected["labelled"]
    lost = [i for i in labelled if i not in ledger.finals]
    wrong = [i for i, y in labelled.items() if i in ledger.finals and ledger.finals[i] != {tuple(y)}]
    conflicting = [i for i, ys in ledger.finals.items() if len(ys) > 1]
    seen = ledger.dead_keys()
    missing_dead = missing_dead_letters(expected["dead_required"], seen)
    dead_of: dict[str, list[tuple[str, str]]] = {}
    for d in ledger.dead:
        dead_of.setdefault(d.get("key") or "", []).append((d["source_topic"], d["reason"]))
    partitions = Settings().event_partitions

    def partition(iid: str) -> int:
        return (murmur2(iid.encode()) & 0x7FFFFFFF) % partitions

    # the answer key requires a final once the impressions' event time passed its due by a margin
    # (simulators/faults.py END_MARGIN_MS); a partition of a sparse tail can stop short of that.
    # Its clock is the second-newest impression it got (stream/join/watermark.py).
    stamps: dict[int, list[int]] = {}
    for t in stream.truth:
        stamps.setdefault(partition(t.impression_id), []).append(t.event_time_ms)
    clock = {p: sorted(ts)[-2] for p, ts in stamps.items() if len(ts) > 1}
    truth = {t.impression_id: t for t in stream.truth}

    def due(iid: str) -> bool:
        t = truth[iid]
        if t.final_at_ms is None or t.final_lane is None:
            return True
        return clock.get(partition(iid), 0) >= t.final_at_ms + stream.rules.lateness_ms[t.final_lane]

    lost_due = [i for i in lost if due(i)]
    return {
        "labels_checked": len(labelled),
        "labels_lost": len(lost_due),
        "labels_not_due": len(lost) - len(lost_due),
        "labels_wrong": len(wrong),
        "duplicate_finals": len(conflicting),
        "dead_letters_missing": len(missing_dead),
        "dead_letters_unexplained": len(seen - expected["dead"]),
        "final_records": ledger.final_records,
        "final_records_replayed": ledger.final_records - len(ledger.finals),
        "leaves": dict(Counter(how for _, how in cycles if how != "start")),
        "cycles": cycles,
        "wall_s": round(wall_s, 1),
        "examples": {
            "lost": [
                {"impression_id": i, "partition": partition(i), "due": due(i),
                 "first_sample": i in ledger.sampled, "dead_letters": dead_of.get(i, [])}
                for i in lost[:10]
            ],
            "wrong": [{"impression_id": i, "truth": list(labelled[i]), "finals": sorted(map(list, ledger.finals[i]))}
                      for i in wrong[:5]],
            "missing_dead": [
                {"dead_letter": list(m), "partition": partition(m[0]),
                 "cause": [d.cause for d in stream.dead_letters if (d.impression_id, d.step, d.reason) == m],
                 "event_time_ms": [d.event_time_ms for d in stream.dead_letters
                                   if (d.impression_id, d.step, d.reason) == m],
                 "truth_labels": list(truth[m[0]].labels) if m[0] in truth else None,
                 "final_labels": list(truth[m[0]].final_labels or ()) if m[0] in truth else None,
                 "faults": [(f.kind, f.step) for f in stream.faults if f.impression_id == m[0]],
                 "finals": sorted(map(list, ledger.finals.get(m[0], ()))), "dead_letters": dead_of.get(m[0], [])}
                for m in missing_dead[:10]
            ],
        },
    }


if __name__ == "__main__":
    raise SystemExit(main())
