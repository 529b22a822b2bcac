"""The real processes (broker, joiner, trainer, scorer from the Procfile): every record they publish on
samples (binary ones read as the JSON object they stand for), scores, model-versions and dead-letters
meets its JSON Schema in deploy/schemas/, and the
scorer's HTTP endpoint is alive at once but ready only with a verified model version."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import jsonschema

from bench.supervisor import Supervisor
from bench.topic_reader import TopicTail
from simulators.faults import FaultConfig, SimulatedStream
from simulators.funnel import FunnelSimulator, SimConfig
from simulators.kafka_sink import Background, produce
from stream.ops.settings import Settings
from tests.e2e.outputs import sample_object
from tests.e2e.pipeline import pipeline_env, start_pipeline

SCHEMAS = Path(__file__).resolve().parents[2] / "deploy" / "schemas"


def get(url: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_published_records_meet_their_schemas_and_readiness_waits_for_a_model(tmp_path: Path) -> None:
    env = pipeline_env(tmp_path)
    env["MODEL_STORE_DIR"] = str(tmp_path / "models")
    settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    topics = {settings.topic_samples: "samples", settings.topic_scores: "scores",
              settings.topic_model_versions: "model-versions", settings.topic_dead_letters: "dead-letters"}
    got: dict[str, list[bytes]] = defaultdict(list)
    sim = FunnelSimulator(SimConfig(seed=41, impressions_per_day=2_000))
    stream = SimulatedStream(sim, 1, FaultConfig.uniform(0.01), tail_days=16, tail_impressions_per_day=50)
    http = f"http://127.0.0.1:{env['SCORER_HTTP_PORT']}"
    with Supervisor(env, tmp_path / "logs") as sup:
        start_pipeline(sup)
        assert get(f"{http}/livez") == (200, {"status": "alive"})
        assert get(f"{http}/readyz") == (503, {"status": "no model", "model_version": None})
        tail = TopicTail(settings, list(topics), lambda rec: got[topics[rec.topic]].append(rec.value)).start()
        producer = Background(produce, stream, settings, speedup=17 * 86_400 / 40)
        producer.start()
        producer.result()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (
            len(got["scores"]) >= 2_000 and got["model-versions"] and got["dead-letters"]
            and any(sample_object(v)["kind"] == "final" for v in got["samples"])
        ):
            for name in ("joiner", "trainer", "scorer"):
                assert sup.alive(name), f"{name} died:\n{sup.tail(name)}"
            time.sleep(1)
        code, ready = get(f"{http}/readyz")
        feats = sim.feature_dicts(sim.day_batch(0, 3))
        batch = get(f"{http}/score/batch", json.dumps({"requests": [{"features": f} for f in feats]}).encode())
        time.sleep(2)
        tail.stop()
    assert code == 200 and ready["status"] == "ready" and ready["model_version"] >= 1, ready
    assert batch[0] == 200 and len(batch[1]["results"]) == 3, batch
    counts = {}
    for name, values in got.items():
        schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
        validator = jsonschema.Draft202012Validator(schema)
        read = sample_object if name == "samples" else json.loads  # samples: either encoding
        for value in values:
            errors = [e.message for e in validator.iter_errors(read(value))]
            assert not errors, (name, value[:300], errors)
        counts[name] = len(values)
    print(f"records checked against their schemas: {counts}")
    assert counts["scores"] >= 2_000 and counts["samples"] >= 2_000, counts
    assert counts["model-versions"] >= 1 and counts["dead-letters"] >= 10, counts
