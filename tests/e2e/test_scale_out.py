"""Scale-out: two joiners and two scorers share the partitions, rebalance when one leaves and
joins again, and no final label or score is lost or duplicated (measured)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from bench.supervisor import Supervisor, scrape
from bench.topic_reader import TopicTail
from simulators.faults import FaultConfig, SimulatedStream
from simulators.funnel import FunnelSimulator, SimConfig
from simulators.kafka_sink import Background, produce
from stream.kafka.broker import free_port
from stream.ops.settings import Settings
from tests.e2e.outputs import Outputs, must_label, must_score
from tests.e2e.pipeline import log_evidence, pipeline_env, start_pipeline


def test_two_joiners_and_two_scorers_share_and_rebalance(tmp_path: Path) -> None:
    env = pipeline_env(tmp_path)
    env["MODEL_STORE_DIR"] = str(tmp_path / "models")
    env["LOG_LEVEL"] = "info"  # the joiners log their revocations and assignments (evidence)
    settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    second = {
        "joiner_b": {"DATA_DIR": str(tmp_path / "joiner-b"), "METRICS_PORT_JOINER": str(free_port())},
        "scorer_b": {"METRICS_PORT_SCORER": str(free_port()), "SCORER_HTTP_PORT": str(free_port())},
    }
    sim = FunnelSimulator(SimConfig(seed=31, impressions_per_day=4_000))
    stream = SimulatedStream(sim, 1, FaultConfig.uniform(0.005), tail_days=16, tail_impressions_per_day=100)
    with Supervisor(env, tmp_path / "logs") as sup:
        procfile = start_pipeline(sup)
        for name, extra in second.items():
            sup.start(name, procfile[name.split("_")[0]], extra)
        time.sleep(8)  # both members of each group take partitions
        ledger = Outputs(settings.topic_samples, settings.topic_scores)
        tail = TopicTail(
            settings, [settings.topic_samples, settings.topic_scores, settings.topic_dead_letters], ledger
        )
        tail.start()
        producer = Background(produce, stream, settings, speedup=17 * 86_400 / 60)
        producer.start()
        worked = {"joiner_b": 0.0, "scorer_b": 0.0}
        time.sleep(15)
        for name, metric, port_var in (("joiner_b", "aitm_joiner_events_total", "METRICS_PORT_JOINER"),
                                       ("scorer_b", "aitm_scorer_scores_total", "METRICS_PORT_SCORER")):  # fmt: skip
            snap = scrape(f"http://127.0.0.1:{second[name][port_var]}/metrics")
            worked[name] = sum(v for (n, _), v in snap.items() if n == metric)
        assert sup.stop("joiner_b") == 0 and sup.stop("scorer_b") == 0  # leave: the others take over
        time.sleep(15)
        for name, extra in second.items():  # join again
            sup.start(name, procfile[name.split("_")[0]], extra)
        producer.result()  # every record delivered (else NotDelivered says how many were not)
        labelled, scorable = must_label(stream), must_score(stream)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if all(i in ledger.finals for i in labelled) and all(i in ledger.scored for i in scorable):
                break
            for name in ("joiner", "scorer", "trainer", "joiner_b", "scorer_b"):
                assert sup.alive(name), f"{name} died:\n{sup.tail(name)}"
            time.sleep(2)
        time.sleep(3)
        tail.stop()
    # both members really worked before the rebalance
    assert worked["joiner_b"] > 0 and worked["scorer_b"] > 0, worked
    lost = [i for i in labelled if i not in ledger.finals]
    wrong = [i for i, y in labelled.items() if i in ledger.finals and ledger.finals[i] != {tuple(y)}]
    conflicting = [i for i, ys in ledger.finals.items() if len(ys) > 1]
    unscored = [i for i in scorable if i not in ledger.scored]
    # an impression the simulator delivered twice (a duplicate fault) is rightly scored twice
    delivered_twice = {
        f.impression_id for f in stream.faults if f.kind == "duplicate" and f.step == "impression"
    }
    rescored = sum(n - 1 for i, n in ledger.scored.items() if n > 1 and i not in delivered_twice)
    print(f"scale-out: {len(labelled)} labels checked, {ledger.final_records} final records, "
          f"{len(ledger.scored)} impressions scored, {rescored} scored twice")  # fmt: skip
    if lost or wrong or conflicting:
        from kafka.partitioner.default import murmur2

        parts = settings.event_partitions
        print("lost per partition:", Counter((murmur2(i.encode()) & 0x7FFFFFFF) % parts for i in lost))
        print(log_evidence(tmp_path / "logs", ("joiner", "joiner_b")))
    lost_dead = [
        (d.get("key"), d["source_topic"], d["reason"]) for d in ledger.dead if d.get("key") in set(lost)
    ]
    assert (len(lost), len(wrong), len(conflicting), len(unscored)) == (0, 0, 0, 0), (
        lost[:10],
        [i for i in lost if i in ledger.sampled][:10],  # lost yet sampled (a first sample came out)
        lost_dead[:10],
        wrong[:3],
        unscored[:3],
    )
    assert rescored == 0, f"{rescored} impressions were scored more than once across the rebalance"
