"""The scorer's HTTP endpoint: ``POST /score`` (a request's rules in ``parse_request``) and
``GET /healthz``. Bad input is a 4xx with a JSON ``{"error": ...}`` saying what is wrong."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from stream.contract.events import (
    MAX_ID_LEN,
    MAX_RECORD_BYTES,
    InvalidRecord,
    loads_strict,
    validate_features,
)
from stream.serve.scoring import ScoringModel


class BadRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_request(body: bytes) -> tuple[str, dict[str, str], str | None]:
    """(bank_id, features, impression_id) of a ``POST /score`` body; ``BadRequest`` (400) if wrong."""
    try:
        obj = loads_strict(body, "request body")
    except InvalidRecord as exc:
        raise BadRequest(400, exc.message) from None
    if not isinstance(obj, dict):
        raise BadRequest(400, 'the body must be a JSON object like {"bank_id": "bank_2", "features": {...}}')
    unknown = set(obj) - {"bank_id", "features", "impression_id"}
    if unknown:
        raise BadRequest(
            400, f"unknown field(s) {sorted(unknown)}; allowed: bank_id, features, impression_id"
        )
    if "features" not in obj:
        raise BadRequest(400, "'features' is required: an object of feature name -> string value")
    try:
        feats = validate_features(obj["features"])
    except InvalidRecord as exc:
        raise BadRequest(400, exc.message) from None
    bank = obj.get("bank_id", "")
    if not isinstance(bank, str) or len(bank) > MAX_ID_LEN:
        raise BadRequest(400, f"'bank_id' must be a string of at most {MAX_ID_LEN} characters")
    iid = obj.get("impression_id")
    if iid is not None and (not isinstance(iid, str) or len(iid) > MAX_ID_LEN):
        raise BadRequest(400, f"'impression_id' must be a string of at most {MAX_ID_LEN} characters")
    return bank, feats, iid


class Backend(Protocol):
    """What the endpoint needs from the scorer."""

    model: ScoringModel | None
    metrics: Any
    http_latency: Any

    def http_score(self, body: bytes) -> tuple[int, dict[str, Any]]: ...


class ScoringServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: Backend) -> None:
        self.backend = backend
        super().__init__(address, ScoringHandler)


class ScoringHandler(BaseHTTPRequestHandler):
    """``POST /score`` and ``GET /healthz`` over the standard library's threaded server; the
    endpoint's logic is the backend's (``ScoringServer.backend``)."""

    server: ScoringServer

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _reply(self, code: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        self.server.backend.metrics.http_requests.labels(code=str(code)).inc()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            m = self.server.backend.model
            self._reply(
                200 if m else 503,
                {"status": "ok" if m else "no model", "model_version": m.version if m else None},
            )
        elif self.path == "/score":
            self._reply(405, {"error": "use POST /score with a JSON body"})
        else:
            self._reply(404, {"error": f"no such path {self.path[:60]!r}; use POST /score"})

    def do_POST(self) -> None:
        t0 = time.perf_counter()
        if self.path != "/score":
            self._drain()
            self._reply(404, {"error": f"no such path {self.path[:60]!r}; use POST /score"})
            return
        ctype = self.headers.get("Content-Type", "application/json")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._reply(411, {"error": "send a Content-Length header"})
            return
        n = int(length)
        if n > MAX_RECORD_BYTES:
            self.close_connection = True
            self._reply(413, {"error": f"body of {n} bytes; at most {MAX_RECORD_BYTES}"})
            return
        body = self.rfile.read(n)
        if not ctype.startswith("application/json"):
            self._reply(415, {"error": f"Content-Type {ctype[:40]!r}; send application/json"})
            return
        code, obj = self.server.backend.http_score(body)
        if code == 200:
            self.server.backend.http_latency.observe(time.perf_counter() - t0)
        self._reply(code, obj)

    def _drain(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= MAX_RECORD_BYTES:
            self.rfile.read(int(length))
        else:
            self.close_connection = True


def serve_http(backend: Backend, host: str, port: int) -> ScoringServer:
    """Start the endpoint in a daemon thread; returns the server (``server_address``)."""
    server = ScoringServer((host, port), backend)
    threading.Thread(target=server.serve_forever, name="scorer-http", daemon=True).start()
    return server
