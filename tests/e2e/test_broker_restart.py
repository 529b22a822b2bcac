"""A broker restart mid-stream: every process reconnects and carries on; what the memory-only
embedded broker loses is measured and reported."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.supervisor import Supervisor, wait_http
from bench.topic_reader import TopicTail, read_topic
from simulators.faults import SimulatedStream
from simulators.funnel import FunnelSimulator, SimConfig
from simulators.kafka_sink import produce
from stream.ops.settings import Settings
from tests.e2e.outputs import Outputs
from tests.e2e.pipeline import pipeline_env, start_pipeline

PROCESSES = ("joiner", "trainer", "scorer")


def test_processes_survive_a_broker_restart(tmp_path: Path) -> None:
    env = pipeline_env(tmp_path)
    settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    sim = FunnelSimulator(SimConfig(seed=41, impressions_per_day=3_000))
    before = SimulatedStream(sim, 1, tail_days=2, tail_impressions_per_day=300)
    after = SimulatedStream(sim, 1, tail_days=2, tail_impressions_per_day=300, start_day=10)
    report: dict[str, object] = {}
    with Supervisor(env, tmp_path / "logs") as sup:
        procfile = start_pipeline(sup)
        sent_before = sum(produce(before, settings, speedup=3 * 86_400 / 20).values())
        time.sleep(10)
        samples_before = len(read_topic(settings, settings.topic_samples, idle_s=2))
        announced = read_topic(settings, settings.topic_model_versions, idle_s=1)
        versions_before = len(announced)
        assert samples_before > 0 and versions_before > 0
        newest_before = max(json.loads(v.value)["version"] for v in announced)
        # the broker dies and comes back empty (memory storage), on the same port
        sup.kill("broker")
        time.sleep(3)
        sup.start("broker", procfile["broker"], {"KAFKA_BOOTSTRAP_SERVERS": ""})
        wait_http(f"http://127.0.0.1:{env['METRICS_PORT_BROKER']}/metrics", 30, lambda: sup.alive("broker"))
        time.sleep(3)
        report["event_records_lost_with_broker"] = sent_before
        report["samples_lost_with_broker"] = samples_before
        report["model_versions_lost_with_broker"] = versions_before
        report["samples_left_after_restart"] = len(read_topic(settings, settings.topic_samples, idle_s=1))
        ledger = Outputs(settings.topic_samples, settings.topic_scores)
        tail = TopicTail(
            settings, [settings.topic_samples, settings.topic_scores, settings.topic_dead_letters], ledger
        )
        tail.start()
        sent_after = sum(produce(after, settings, speedup=3 * 86_400 / 20).values())
        new_ids = {t.impression_id for t in after.truth if not t.tail}
        # two tail days mature the impressions without a click (their click window is 1 h)
        unclicked = {t.impression_id: t.labels for t in after.truth if not t.tail and not t.labels[0]}
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            sampled = sum(1 for i in new_ids if i in ledger.sampled)
            finals = sum(1 for i in unclicked if i in ledger.finals)
            scored = sum(1 for i in new_ids if i in ledger.scored)
            if (sampled, finals, scored) == (len(new_ids), len(unclicked), len(new_ids)):
                break
            time.sleep(2)
        tail.stop()
        versions_after = read_topic(settings, settings.topic_model_versions, idle_s=1)
        crashed = [name for name in PROCESSES if not sup.alive(name)]
        report.update(
            event_records_after=sent_after,
            impressions_after=len(new_ids),
            sampled_after=sum(1 for i in new_ids if i in ledger.sampled),
            unclicked_after=len(unclicked),
            unclicked_finals_after=sum(1 for i in unclicked if i in ledger.finals),
            unclicked_finals_right=sum(1 for i, y in unclicked.items() if ledger.finals.get(i) == {tuple(y)}),
            scored_after=sum(1 for i in new_ids if i in ledger.scored),
            model_versions_after=len(versions_after),
            crashed=crashed,
        )
        logs = {name: sup.tail(name, 5) for name in crashed}
    print("broker restart:", json.dumps(report))
    assert not crashed, logs
    assert report["samples_left_after_restart"] == 0  # the loss is real, and reported above
    # every process carried on with the new traffic
    assert report["sampled_after"] == len(new_ids), report
    assert report["unclicked_finals_right"] == len(unclicked), report
    assert report["scored_after"] == len(new_ids), report
    assert len(versions_after) > 0
    assert max(json.loads(v.value)["version"] for v in versions_after) > newest_before
