"""The scorer's HTTP endpoint (a real aiohttp server on loopback): scores, batches, readiness, and clear
4xx errors."""

from __future__ import annotations

import http.client
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry

from aitm.checkpoint import make_checkpoint
from aitm.features import FeatureEncoder
from aitm.model import AITM, AITMConfig
from stream.contract.events import Event, encode_event
from stream.ops.clock import FakeClock
from stream.ops.settings import Settings
from stream.serve.scorer import BadRequest, BankPolicy, Scorer, ScoringModel, parse_request


@pytest.fixture
def scorer(tmp_path: Path) -> Iterator[tuple[Scorer, int]]:
    settings = Settings(data_dir=tmp_path, scorer_bank_objectives={"bank_9": "activation"},
                        scorer_bank_weights={"bank_9": 2.5})
    s = Scorer(settings, CollectorRegistry())
    server = s.serve_http("127.0.0.1", 0)
    yield s, int(server.server_address[1])
    s.close()


def load_model(s: Scorer, version: int = 1) -> None:
    torch.manual_seed(0)
    enc = FeatureEncoder(("a", "b"), capacity=8, min_count=1)
    enc.encode_dicts([{"a": "x", "b": "y"}], update=True)
    cfg = AITMConfig(vocab_sizes=enc.vocab_sizes)
    s.model = ScoringModel.from_checkpoint(version, make_checkpoint(AITM(cfg), cfg, enc.state_dict(), 0), 1)


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_scores_a_request(scorer: tuple[Scorer, int]) -> None:
    s, port = scorer
    load_model(s, version=7)
    code, body = call(port, "POST", "/score", json.dumps({"bank_id": "bank_9", "features": {"a": "x", "b": "y"},
                                                           "impression_id": "i-1"}).encode())
    assert code == 200, body
    p = body["probabilities"]
    assert list(p) == ["click", "application", "approval", "activation"]
    assert all(0 < v < 1 for v in p.values())
    assert body["model_version"] == 7 and body["impression_id"] == "i-1"
    assert body["objective"] == "activation" and body["weight"] == 2.5
    assert body["score"] == pytest.approx(2.5 * p["activation"], rel=1e-5)
    code, body = call(port, "POST", "/score", json.dumps({"features": {"a": "unseen"}}).encode())
    assert code == 200 and body["objective"] == "approval" and body["weight"] == 1.0  # defaults, OOV ok
    assert s.metrics.registry.get_sample_value("aitm_scorer_http_requests_total", {"code": "200"}) == 2


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "code", "says"),
    [
        ("POST", "/score", b"{not json", None, 400, "not valid JSON"),
        ("POST", "/score", b"[1, 2]", None, 400, "JSON object"),
        ("POST", "/score", b'{"bank_id": "b"}', None, 400, "'features' is required"),
        ("POST", "/score", b'{"features": {"a": 1}}', None, 400, "must be a string"),
        ("POST", "/score", b'{"features": {}, "extra": 1}', None, 400, "unknown field"),
        ("POST", "/score", b'{"features": {"a": "x"}, "bank_id": 5}', None, 400, "bank_id"),
        ("POST", "/score", b'{"features": {"a": NaN}}', None, 400, "NaN"),
        ("POST", "/score", b"x" * 70_000, None, 413, "at most"),
        ("POST", "/score", b'{"features": {}}', {"Content-Type": "text/plain"}, 415, "application/json"),
        ("POST", "/nope", b"{}", None, 404, "POST /score"),
        ("GET", "/score", None, None, 405, "POST"),
    ],
)
def test_bad_requests_get_a_clear_4xx(scorer: tuple[Scorer, int], method: str, path: str, body: bytes | None,
                                      headers: dict[str, str] | None, code: int, says: str) -> None:
    s, port = scorer
    load_model(s)
    got, obj = call(port, method, path, body, headers)
    assert got == code
    assert says in obj["error"]


def test_no_model_yet_is_503_and_only_readiness_says_so(scorer: tuple[Scorer, int]) -> None:
    s, port = scorer
    assert call(port, "POST", "/score", b'{"features": {}}')[0] == 503
    assert call(port, "POST", "/score/batch", b'{"requests": [{"features": {}}]}')[0] == 503
    assert call(port, "GET", "/readyz") == (503, {"status": "no model", "model_version": None})
    assert call(port, "GET", "/livez") == (200, {"status": "alive"})  # alive, just not ready
    assert call(port, "GET", "/healthz") == (200, {"status": "alive"})  # the old name: liveness
    load_model(s, 3)
    assert call(port, "GET", "/readyz") == (200, {"status": "ready", "model_version": 3})
    assert call(port, "GET", "/livez") == (200, {"status": "alive"})


def test_bank_policy_is_eq1() -> None:
    policy = BankPolicy("approval", {"b1": "activation"}, 1.0, {"b1": 3.0})
    import numpy as np

    assert policy.score("b1", np.array([0.5, 0.1, 0.05, 0.02])) == ("activation", 3.0, pytest.approx(0.06))
    assert policy.score("b2", np.array([0.5, 0.1, 0.05, 0.02])) == ("approval", 1.0, 0.05)


# --- the scores are the model's own output, per task by name -----------------------------------

FEATURES = [{"a": "x", "b": "y"}, {"a": "z", "b": "y"}, {"a": "x", "b": "w"}, {"a": "unseen"}]
RAW_RATES = (0.3, 0.1, 0.05, 0.02)  # the model's base rates of click, application, approval, activation


def known_model(version: int = 5) -> ScoringModel:
    """A version whose end-to-end probabilities differ per task (and per feature value)."""
    torch.manual_seed(1)
    enc = FeatureEncoder(("a", "b"), capacity=8, min_count=1)
    enc.encode_dicts(FEATURES[:3], update=True)
    cfg = AITMConfig(vocab_sizes=enc.vocab_sizes)
    model = AITM(cfg)
    with torch.no_grad():
        p = torch.tensor(RAW_RATES)
        model.head_b.copy_(torch.log(p / (1 - p)))
    return ScoringModel.from_checkpoint(version, make_checkpoint(model, cfg, enc.state_dict(), 0), 1)


def expected_by_task(m: ScoringModel, features: dict[str, str]) -> dict[str, float]:
    """The model's own output on these features, by task name: AITM's end-to-end logits are in
    funnel order (click, application, approval, activation); the scorer serves them through a
    sigmoid, each step capped by the step before it (docs: aitm/projection.py)."""
    with torch.no_grad():
        logits = m.model(torch.as_tensor(m.encoder.encode_dicts([features])))[0]
    raw = [1.0 / (1.0 + math.exp(-float(z))) for z in logits]
    served, cap = [], 1.0
    for p in raw:
        cap = min(cap, p)
        served.append(cap)
    return dict(zip(("click", "application", "approval", "activation"), served, strict=True))


def test_the_premise_tasks_differ_so_a_swapped_column_shows() -> None:
    m = known_model()
    for f in FEATURES:
        e = expected_by_task(m, f)
        assert len({round(v, 4) for v in e.values()}) == 4, e  # four distinct values per row


def test_http_scores_are_the_models_output_per_task(scorer: tuple[Scorer, int]) -> None:
    s, port = scorer
    s.model = m = known_model(version=5)
    for f in FEATURES:
        for bank, objective, weight in (("bank_9", "activation", 2.5), ("bank_1", "approval", 1.0)):
            code, body = call(port, "POST", "/score", json.dumps({"bank_id": bank, "features": f}).encode())
            assert code == 200, body
            want = expected_by_task(m, f)
            assert body["probabilities"] == pytest.approx(want, abs=1e-6)  # by name (7 digits)
            assert (body["objective"], body["weight"], body["model_version"]) == (objective, weight, 5)
            assert body["score"] == pytest.approx(weight * want[objective], rel=1e-5)
            assert body["bank_id"] == bank and "impression_id" not in body


def test_published_scores_are_the_models_output_per_task(tmp_path: Path) -> None:
    clock = FakeClock(1_767_300_000_000)
    s = Scorer(Settings(data_dir=tmp_path, scorer_bank_objectives={"bank_9": "activation"},
                        scorer_bank_weights={"bank_9": 2.5}), CollectorRegistry(), clock=clock)
    m = known_model(version=8)
    events = [Event(0, f"e{i}", f"i{i}", 1_767_225_600_000 + i, "bank_9" if i % 2 else "bank_1", f)
              for i, f in enumerate(FEATURES)]
    records = [SimpleNamespace(value=encode_event(e), key=e.impression_id.encode(), topic="imp", partition=0,
                               offset=i) for i, e in enumerate(events)]
    records.insert(2, SimpleNamespace(value=b'{"schema_version": 1}', key=b"bad", topic="imp", partition=0, offset=9))
    out, bad = s.score_batch(m, records)
    assert [(r.key, exc.reason) for r, exc in bad] == [(b"bad", "missing_field")]
    assert [k for k, _ in out] == [e.impression_id.encode() for e in events]
    for e, (_, value) in zip(events, out, strict=True):
        rec = json.loads(value)
        want = expected_by_task(m, dict(e.features or {}))
        assert rec["probabilities"] == pytest.approx(want, abs=1e-6)
        objective, weight = ("activation", 2.5) if e.bank_id == "bank_9" else ("approval", 1.0)
        assert (rec["objective"], rec["weight"]) == (objective, weight)
        assert rec["score"] == pytest.approx(weight * want[objective], rel=1e-5)
        assert (rec["schema_version"], rec["impression_id"], rec["bank_id"], rec["model_version"]) == (
            1, e.impression_id, e.bank_id, 8)
        assert (rec["event_time_ms"], rec["scored_at_ms"]) == (e.event_time_ms, 1_767_300_000_000)
    assert s.score_batch(m, []) == ([], [])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1, 2]", 'the body must be a JSON object like {"bank_id": "bank_2", "features": {...}}'),
        (b'{"bank_id": "b"}', "'features' is required: an object of feature name -> string value"),
        (b'{"features": []}', "'features' must be an object of feature name -> string value"),
        (b'{"features": {"a": 1}}', "feature 'a' must be a string, got int"),
        (b'{"features": {}, "extra": 1, "zz": 2}',
         "unknown field(s) ['extra', 'zz']; allowed: bank_id, features, impression_id"),
        (b'{"features": {"a": "x"}, "bank_id": 5}', "'bank_id' must be a string of at most 128 characters"),
        (json.dumps({"features": {}, "bank_id": "b" * 129}).encode(),
         "'bank_id' must be a string of at most 128 characters"),
        (json.dumps({"features": {f"f{i}": "x" for i in range(257)}}).encode(), "'features' has 257 fields; at most 256"),
        (json.dumps({"features": {"": "x"}}).encode(), "feature '' name or value is empty or longer than 256"),
        (json.dumps({"features": {"a": "x" * 257}}).encode(), "feature 'a' name or value is empty or longer than 256"),
        (json.dumps({"features": {"k" * 257: "x"}}).encode(),
         "feature " + repr("k" * 257)[:40] + " name or value is empty or longer than 256"),
        (json.dumps({"features": {}, "impression_id": 5}).encode(),
         "'impression_id' must be a string of at most 128 characters"),
        (json.dumps({"features": {}, "impression_id": "i" * 129}).encode(),
         "'impression_id' must be a string of at most 128 characters"),
        (b'{"features": {"a": NaN}}', "NaN is not valid JSON; send a finite number"),
    ],
)
def test_a_bad_request_says_exactly_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_request(body)
    assert (err.value.code, err.value.message) == (400, message)


def test_requests_at_the_limits_are_accepted() -> None:
    feats = {f"f{i}": "v" for i in range(254)} | {"k" * 256: "x", "long": "v" * 256}  # 256 fields; 256 chars
    body = json.dumps({"features": feats, "bank_id": "b" * 128, "impression_id": "i" * 128}).encode()
    assert parse_request(body) == ("b" * 128, feats, "i" * 128)
    assert parse_request(b'{"features": {}}') == ("", {}, None)  # no bank: the default policy's


def test_a_body_that_is_not_json_is_named_as_the_request_body() -> None:
    with pytest.raises(BadRequest) as err:
        parse_request(b"{not json")
    assert err.value.code == 400 and err.value.message.startswith("request body is not valid JSON: ")


def test_no_model_yet_says_so_exactly(tmp_path: Path) -> None:
    s = Scorer(Settings(data_dir=tmp_path), CollectorRegistry())
    assert s.http_score(b'{"features": {}}') == (503, {"error": "no model version loaded yet; retry shortly"})


def test_published_scores_are_compact_json_with_seven_digit_probabilities_of_impressions_only(tmp_path: Path) -> None:
    s = Scorer(Settings(data_dir=tmp_path), CollectorRegistry())
    m = known_model()
    imp = Event(0, "e1", "i1", 1_767_225_600_000, "bank_1", FEATURES[0])
    click = Event(1, "e2", "i1", 1_767_225_600_001, "bank_1", None)
    records = [SimpleNamespace(value=encode_event(e), key=b"i1", topic="imp", partition=0, offset=i)
               for i, e in enumerate((imp, click))]
    out, bad = s.score_batch(m, records)
    assert [exc.reason for _, exc in bad] == ["wrong_topic"]  # a click on the impressions topic
    ((_, value),) = out
    rec = json.loads(value)
    assert value == json.dumps(rec, separators=(",", ":")).encode()
    assert all(v == round(v, 7) for v in rec["probabilities"].values())
    assert any(v != round(v, 6) for v in rec["probabilities"].values())  # seven digits, not fewer


# --- the production HTTP stack: keep-alive, chunked bodies, batches, access log -----------------


def test_one_keep_alive_connection_serves_many_requests(scorer: tuple[Scorer, int]) -> None:
    s, port = scorer
    load_model(s, 4)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.connect()
        sock = conn.sock
        for i in range(20):
            conn.request("POST", "/score", body=json.dumps({"features": {"a": "x"}, "impression_id": f"i{i}"}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["impression_id"] == f"i{i}"
            assert resp.getheader("Connection", "keep-alive").lower() != "close"
        assert conn.sock is sock  # never reconnected
    finally:
        conn.close()


def chunked(parts: list[bytes]) -> Iterator[bytes]:
    yield from parts


def test_a_chunked_body_is_accepted(scorer: tuple[Scorer, int]) -> None:
    s, port = scorer
    load_model(s, 4)
    body = json.dumps({"bank_id": "bank_9", "features": {"a": "x", "b": "y"}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/score", body=chunked([body[:7], body[7:20], body[20:]]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        out = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200, out
    assert out["probabilities"] == pytest.approx(call(port, "POST", "/score", body)[1]["probabilities"])


def test_a_chunked_body_over_the_limit_is_413(scorer: tuple[Scorer, int]) -> None:
    s, port = scorer
    load_model(s)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/score", body=chunked([b" " * 40_000, b" " * 40_000]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413
        assert "at most 65536" in json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_a_batch_is_scored_by_one_version_in_request_order(scorer: tuple[Scorer, int]) -> None:
    s, port = scorer
    s.model = m = known_model(version=6)
    s.fast.build_after = 0
    s.fast.fast_for(m)  # the onnxruntime copy, ready before the first call: every answer from one engine
    assert s.fast.ready.wait(60) and s.fast.fast_for(m) is not None
    reqs = [{"bank_id": "bank_9" if i % 2 else "bank_1", "features": f, **({"impression_id": f"i{i}"} if i else {})}
            for i, f in enumerate(FEATURES * 30)]  # 120 impressions
    code, body = call(port, "POST", "/score/batch", json.dumps({"requests": reqs}).encode())
    assert code == 200, body
    assert body["model_version"] == 6 and len(body["results"]) == len(reqs)
    for req, got in zip(reqs, body["results"], strict=True):
        want = expected_by_task(m, req["features"])
        assert got["probabilities"] == pytest.approx(want, abs=1e-6)
        objective, weight = ("activation", 2.5) if req["bank_id"] == "bank_9" else ("approval", 1.0)
        assert (got["objective"], got["weight"], got["bank_id"]) == (objective, weight, req["bank_id"])
        assert got["score"] == pytest.approx(weight * want[objective], rel=1e-5)
        assert got.get("impression_id") == req.get("impression_id")
        # the same answer as one POST /score with that item
        assert got == call(port, "POST", "/score", json.dumps(req).encode())[1]
    reg = s.metrics.registry
    assert reg.get_sample_value("aitm_scorer_http_impressions_total") == 2 * len(reqs)
    assert reg.get_sample_value("aitm_scorer_latency_seconds_count", {"path": "http_batch"}) == 1
    assert reg.get_sample_value("aitm_scorer_latency_seconds_count", {"path": "http"}) == len(reqs)


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (b'[{"features": {}}]', 400, '{"requests": [{"features": {...}}, ...]}'),
        (b'{"features": {}}', 400, '{"requests": [{"features": {...}}, ...]}'),
        (b'{"requests": [], "x": 1}', 400, "unknown field(s) ['x']; allowed: requests"),
        (b'{"requests": []}', 400, "'requests' must be a non-empty list"),
        (b'{"requests": {"features": {}}}', 400, "'requests' must be a non-empty list"),
        (b'{"requests": [{"features": {}}, {"features": {"a": 1}}]}', 400,
         "requests[1]: feature 'a' must be a string, got int"),
        (b'{"requests": [{"features": {}}, 7]}', 400, "requests[1]: the body must be a JSON object"),
        (b'{"requests": [{"bank": "b", "features": {}}]}', 400, "requests[0]: unknown field(s) ['bank']"),
        (b'{"requests": [{"features": {}}]', 400, "request body is not valid JSON"),
        (json.dumps({"requests": [{"features": {}}] * 1001}).encode(), 400,
         "'requests' has 1001 items; at most 1000 per call"),
        pytest.param(b"[" + b" " * (4 << 20) + b"]", 413, f"at most {4 << 20}", id="body-over-4MiB"),
    ],
)
def test_a_bad_batch_gets_a_clear_4xx_and_scores_nothing(scorer: tuple[Scorer, int], body: bytes, code: int,
                                                          says: str) -> None:
    s, port = scorer
    load_model(s)
    got, obj = call(port, "POST", "/score/batch", body)
    assert got == code
    assert says in obj["error"]
    assert s.metrics.registry.get_sample_value("aitm_scorer_http_impressions_total") == 0
    assert s.metrics.registry.get_sample_value("aitm_scorer_http_requests_total", {"code": str(code)}) == 1


def test_a_batch_at_its_limits_is_accepted(tmp_path: Path) -> None:
    s = Scorer(Settings(data_dir=tmp_path, scorer_http_max_batch=3), CollectorRegistry())
    s.model = known_model()
    body = json.dumps({"requests": [{"features": {"a": "x"}}] * 3}).encode()
    code, out = s.http_score_batch(body)
    assert code == 200 and len(out["results"]) == 3
    assert s.http_score_batch(json.dumps({"requests": [{"features": {}}] * 4}).encode()) == (
        400, {"error": "'requests' has 4 items; at most 3 per call"})


def test_every_request_gets_an_access_log_line(scorer: tuple[Scorer, int], caplog: pytest.LogCaptureFixture) -> None:
    s, port = scorer
    load_model(s)
    with caplog.at_level("INFO", logger="aitm.scorer.access"):
        call(port, "POST", "/score", b'{"features": {"a": "x"}}')
        call(port, "POST", "/score", b"{bad")
        call(port, "GET", "/readyz")
        deadline = time.monotonic() + 5  # a line is written just after its response is sent
        while len(lines := [r.getMessage() for r in caplog.records if r.name == "aitm.scorer.access"]) < 3:
            assert time.monotonic() < deadline, lines
            time.sleep(0.01)
    assert len(lines) == 3, lines
    assert '"POST /score HTTP/1.1" 200' in lines[0] and '"POST /score HTTP/1.1" 400' in lines[1]
    assert '"GET /readyz HTTP/1.1" 200' in lines[2]


def test_concurrent_requests_each_get_their_own_answer(scorer: tuple[Scorer, int]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    s, port = scorer
    s.model = m = known_model(version=9)
    reqs = [{"bank_id": "bank_9", "features": FEATURES[i % 4], "impression_id": f"c{i}"} for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: call(port, "POST", "/score", json.dumps(r).encode()), reqs))
    for req, (code, got) in zip(reqs, answers, strict=True):
        assert code == 200 and got["impression_id"] == req["impression_id"]
        assert got["probabilities"] == pytest.approx(expected_by_task(m, req["features"]), abs=1e-6)


def test_requests_parsed_in_one_loop_turn_share_one_forward_pass() -> None:
    import asyncio

    from stream.serve.http import Coalescer

    calls: list[int] = []

    def score_items(items):  # type: ignore[no-untyped-def]
        calls.append(len(items))
        return 200, [{"i": it[2]} for it in items]

    async def run() -> list[tuple[int, dict]]:
        c = Coalescer(score_items, max_items=4)
        futs = [c.score(("", {}, str(i))) for i in range(6)]  # one turn: 4 + 2
        first = await asyncio.gather(*futs)
        return [*first, await c.score(("", {}, "later"))]  # a lone request: a pass of its own

    out = asyncio.run(run())
    assert calls == [4, 2, 1]
    assert [o[1]["i"] for o in out] == ["0", "1", "2", "3", "4", "5", "later"]


def test_the_traced_model_serves_the_same_bits_as_the_eager_one() -> None:
    import dataclasses

    import numpy as np

    from stream.serve.scoring import traced

    eager = known_model()
    assert eager.fast is None  # tracing is opt-in (SCORER_TORCHSCRIPT)
    m = dataclasses.replace(eager, fast=traced(eager.model, len(eager.encoder.fields)))
    assert m.fast is not None
    for n in (1, 3, 50, 513):
        rows = [FEATURES[i % 4] for i in range(n)]
        assert np.array_equal(m.predict(rows), eager.predict(rows))
        want = np.array([list(expected_by_task(m, f).values()) for f in rows])  # (n, T), float64 sigmoid
        assert np.abs(eager.predict(rows) - want).max() < 1e-7


# --- the fast path (stream/serve/fastpath.py) and the access-log line --------------------------


def test_http_answers_come_from_onnxruntime_within_1e5_and_follow_a_new_version(scorer: tuple[Scorer, int]) -> None:
    s, port = scorer
    s.model = m5 = known_model(version=5)
    s.fast.build_after = len(FEATURES)  # the version's 4th impression starts its export
    reqs = [{"bank_id": "bank_1", "features": f} for f in FEATURES]
    assert all(call(port, "POST", "/score", json.dumps(r).encode())[0] == 200 for r in reqs[:3])
    assert s.fast.builds == 0
    assert call(port, "POST", "/score", json.dumps(reqs[3]).encode())[0] == 200  # starts the build
    assert s.fast.ready.wait(60)
    fast = s.fast.fast_for(m5)
    assert fast is not None and fast.source is m5 and s.fast.builds == 1
    for f, r in zip(FEATURES, reqs, strict=True):
        code, got = call(port, "POST", "/score", json.dumps(r).encode())
        assert code == 200 and got["model_version"] == 5
        assert got["probabilities"] == pytest.approx(expected_by_task(m5, f), abs=1e-5)
    # hot reload: a new version is answered by itself at once (eager), then by its own copy
    torch.manual_seed(7)
    load_model(s, version=6)
    m6 = s.model
    assert m6 is not None and m6 is not m5
    for _ in range(2):  # before and after its copy is ready
        for f, r in zip(FEATURES, reqs, strict=True):
            code, got = call(port, "POST", "/score", json.dumps(r).encode())
            assert code == 200 and got["model_version"] == 6
            assert got["probabilities"] == pytest.approx(expected_by_task(m6, f), abs=1e-5)
        assert s.fast.ready.wait(60)
    assert s.fast.builds == 2 and s.fast.fast_for(m6) is not None
    code, batch = call(port, "POST", "/score/batch", json.dumps({"requests": reqs}).encode())
    assert code == 200 and batch["model_version"] == 6
    for f, got in zip(FEATURES, batch["results"], strict=True):
        assert got["probabilities"] == pytest.approx(expected_by_task(m6, f), abs=1e-5)


def test_engine_torch_serves_the_eager_model(tmp_path: Path) -> None:
    s = Scorer(Settings(data_dir=tmp_path, scorer_http_engine="torch"), CollectorRegistry())
    s.model = m = known_model(version=2)
    code, out = s.http_score(json.dumps({"features": FEATURES[0]}).encode())
    assert code == 200 and s.fast.builds == 0
    want = m.predict([FEATURES[0]])[0]
    assert [out["probabilities"][t] for t in ("click", "application", "approval", "activation")] == [
        round(float(p), 7) for p in want]


def test_the_access_log_line_is_aiohttps_with_the_same_format() -> None:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request
    from aiohttp.web_log import AccessLogger

    from stream.serve.http import ACCESS_LOG_FORMAT, AccessLog

    logger = logging.getLogger("aitm.test.access")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for method, path, status, body in (("POST", "/score?x=1", 200, b'{"a":1}'), ("GET", "/nope", 404, b"")):
            req = make_mocked_request(method, path)
            resp = web.Response(status=status, body=body)
            resp._body_length = len(body)  # as after sending
            AccessLogger(logger, ACCESS_LOG_FORMAT).log(req, resp, 0.0012345)
            AccessLog(logger, ACCESS_LOG_FORMAT).log(req, resp, 0.0012345)
            theirs, ours = (r.getMessage() for r in records[-2:])
            assert ours == theirs, (ours, theirs)
            assert f'"{method} {path} HTTP/1.1" {status} {len(body)} 0.001234' in ours
        logger.setLevel(logging.WARNING)
        assert not AccessLog(logger, ACCESS_LOG_FORMAT).enabled
    finally:
        logger.removeHandler(handler)
