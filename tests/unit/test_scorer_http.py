"""The scorer's synchronous HTTP endpoint (a real server on loopback): scores, and clear 4xx errors."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from aitm.checkpoint import make_checkpoint
from aitm.features import FeatureEncoder
from aitm.model import AITM, AITMConfig
from stream.ops.settings import Settings
from stream.serve.scorer import Scorer
from stream.serve.scoring import BankPolicy, ScoringModel


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


def test_no_model_yet_is_503_and_health_says_so(scorer: tuple[Scorer, int]) -> None:
    s, port = scorer
    assert call(port, "POST", "/score", b'{"features": {}}')[0] == 503
    assert call(port, "GET", "/healthz") == (503, {"status": "no model", "model_version": None})
    load_model(s, 3)
    assert call(port, "GET", "/healthz") == (200, {"status": "ok", "model_version": 3})


def test_bank_policy_is_eq1() -> None:
    policy = BankPolicy("approval", {"b1": "activation"}, 1.0, {"b1": 3.0})
    import numpy as np

    assert policy.score("b1", np.array([0.5, 0.1, 0.05, 0.02])) == ("activation", 3.0, pytest.approx(0.06))
    assert policy.score("b2", np.array([0.5, 0.1, 0.05, 0.02])) == ("approval", 1.0, 0.05)
