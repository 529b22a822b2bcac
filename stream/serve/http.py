"""The scorer's HTTP endpoint on aiohttp: ``POST /score`` (one impression), ``POST /score/batch``
(many in one call, one model version), ``GET /livez``, ``GET /readyz`` (``/healthz`` = livez).

HTTP/1.1 keep-alive, chunked request bodies, an access log (logger ``aitm.scorer.access``).
Bad input is a 4xx with a JSON ``{"error": ...}`` saying what is wrong; a request's rules are in
``parse_request`` and ``parse_batch``. The server runs in its own thread with its own event loop
beside the scorer's Kafka loop (uvloop's when installed); scoring runs inline on that loop (a
batch-1 forward pass through onnxruntime is about 0.05 ms, ``stream.serve.fastpath``: a hop to a
thread pool would cost more than it frees). Answers are encoded with msgspec; the access log
line is built directly (``AccessLog``), not through aiohttp's format interpreter.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol

import msgspec
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from stream.contract.events import (
    MAX_ID_LEN,
    MAX_RECORD_BYTES,
    InvalidRecord,
    loads_strict,
    validate_features,
)
from stream.serve.scoring import ScoringModel

ACCESS_LOG: Final = "aitm.scorer.access"
# remote, request line, status, response bytes, seconds taken
ACCESS_LOG_FORMAT: Final = '%a "%r" %s %b %Tf'
ROUTES: Final = "POST /score, POST /score/batch, GET /livez, GET /readyz"
ITEM_FIELDS: Final = ("bank_id", "features", "impression_id")

Item = tuple[str, dict[str, str], str | None]  # (bank_id, features, impression_id)


class BadRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _item(obj: Any, where: str = "") -> Item:
    """(bank_id, features, impression_id) of one decoded request object; ``where`` prefixes errors
    (``requests[3]: ``) in a batch."""
    if not isinstance(obj, dict):
        raise BadRequest(
            400, where + 'the body must be a JSON object like {"bank_id": "bank_2", "features": {...}}'
        )
    unknown = set(obj) - set(ITEM_FIELDS)
    if unknown:
        raise BadRequest(
            400, f"{where}unknown field(s) {sorted(unknown)}; allowed: bank_id, features, impression_id"
        )
    if "features" not in obj:
        raise BadRequest(400, where + "'features' is required: an object of feature name -> string value")
    try:
        feats = validate_features(obj["features"])
    except InvalidRecord as exc:
        raise BadRequest(400, where + exc.message) from None
    bank = obj.get("bank_id", "")
    if not isinstance(bank, str) or len(bank) > MAX_ID_LEN:
        raise BadRequest(400, f"{where}'bank_id' must be a string of at most {MAX_ID_LEN} characters")
    iid = obj.get("impression_id")
    if iid is not None and (not isinstance(iid, str) or len(iid) > MAX_ID_LEN):
        raise BadRequest(400, f"{where}'impression_id' must be a string of at most {MAX_ID_LEN} characters")
    return bank, feats, iid


def parse_request(body: bytes) -> Item:
    """(bank_id, features, impression_id) of a ``POST /score`` body; ``BadRequest`` (400) if wrong."""
    try:
        obj = loads_strict(body, "request body")
    except InvalidRecord as exc:
        raise BadRequest(400, exc.message) from None
    return _item(obj)


def parse_batch(body: bytes, max_items: int, max_bytes: int) -> list[Item]:
    """The items of a ``POST /score/batch`` body ``{"requests": [{...}, ...]}``, each item as in
    ``POST /score``; ``BadRequest`` (400, naming the item) if any is wrong: all or nothing."""
    try:
        obj = loads_strict(body, "request body", max_bytes=max_bytes)
    except InvalidRecord as exc:
        raise BadRequest(400, exc.message) from None
    if not isinstance(obj, dict) or "requests" not in obj:
        raise BadRequest(400, 'the body must be a JSON object like {"requests": [{"features": {...}}, ...]}')
    if set(obj) != {"requests"}:
        raise BadRequest(400, f"unknown field(s) {sorted(set(obj) - {'requests'})}; allowed: requests")
    items = obj["requests"]
    if not isinstance(items, list) or not items:
        raise BadRequest(400, "'requests' must be a non-empty list of score requests")
    if len(items) > max_items:
        raise BadRequest(400, f"'requests' has {len(items)} items; at most {max_items} per call")
    return [_item(x, f"requests[{i}]: ") for i, x in enumerate(items)]


Answer = tuple[int, list[dict[str, Any]] | dict[str, Any]]  # (200, one per item) or (code, error)


class Backend(Protocol):
    """What the endpoint needs from the scorer."""

    model: ScoringModel | None
    metrics: Any
    http_latency: Any
    http_batch_latency: Any

    def http_score_batch(self, body: bytes) -> tuple[int, dict[str, Any]]: ...

    def score_items(self, items: Sequence[Item]) -> Answer: ...


class Coalescer:
    """Single requests parsed in the same turn of the event loop are scored in one forward pass.

    The first request of a turn schedules a flush with ``call_soon``: it runs once every handler
    that was ready in that turn has parsed its body, so a lone request waits for nothing, and
    requests that piled up while the previous pass ran share the next one (a batch-1 pass costs
    about as much as a batch-20 one). Every answer of a flush comes from one model version.
    """

    def __init__(self, score_items: Callable[[Sequence[Item]], Answer], max_items: int = 256) -> None:
        self.score_items = score_items
        self.max_items = max_items
        self._pending: list[tuple[Item, asyncio.Future[tuple[int, dict[str, Any]]]]] = []

    def score(self, item: Item) -> asyncio.Future[tuple[int, dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, dict[str, Any]]] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((item, fut))
        return fut

    def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_items], self._pending[self.max_items :]
            try:
                code, out = self.score_items([item for item, _ in batch])
            except Exception as exc:  # a broken version must not leave requests hanging
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for i, (_, fut) in enumerate(batch):
                if not fut.done():  # the client may have gone
                    fut.set_result((code, out[i] if isinstance(out, list) else out))


_encode = msgspec.json.Encoder().encode  # compact, as json.dumps(separators=(",", ":")); 14x faster


def _json(code: int, obj: dict[str, Any]) -> web.Response:
    return web.Response(status=code, body=_encode(obj), content_type="application/json")


class AccessLog(AbstractAccessLogger):
    """One line per request on logger ``aitm.scorer.access``, as aiohttp's ``AccessLogger`` with
    ``ACCESS_LOG_FORMAT`` writes it (remote, request line, status, body bytes, seconds), built with
    one f-string and handed to the logger without looking up the caller's frame: a third of the
    cost of aiohttp's per-request format interpreter."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        v = request.version
        msg = (f'{request.remote or "-"} "{request.method} {request.path_qs} HTTP/{v.major}.{v.minor}" '
               f"{response.status} {response.body_length} {time:06f}")
        logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, msg, (), None))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def new_event_loop(use_uvloop: bool = True) -> asyncio.AbstractEventLoop:
    """uvloop's event loop (libuv: about half the per-request cost of asyncio's selector loop) if
    installed and wanted, else asyncio's."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # an optional speed-up (not on every platform)
            pass
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body (Content-Length or chunked) up to ``limit`` bytes; ``BadRequest`` 413/415 else."""
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(413, f"body of {request.content_length} bytes; at most {limit}")
    ctype = request.headers.get("Content-Type", "application/json")
    if not ctype.startswith("application/json"):
        raise BadRequest(415, f"Content-Type {ctype[:40]!r}; send application/json")
    chunks, size = [], 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"body of more than {limit} bytes; at most {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(backend: Backend, max_body_bytes: int = MAX_RECORD_BYTES,
              max_batch_bytes: int = 4 << 20) -> web.Application:
    """The aiohttp application: routes, JSON errors for every 4xx, requests counted by status."""
    counter = backend.metrics.http_requests

    @web.middleware
    async def json_errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except BadRequest as exc:
            resp = _json(exc.code, {"error": exc.message})
            if exc.code in (413, 415):  # the rest of the body was not read: the connection cannot go on
                resp.force_close()
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            resp = _json(405, {"error": f"{request.method} is not allowed on {request.path[:60]!r}; use {allowed}"
                                        + (" with a JSON body" if "POST" in allowed else "")})
        except web.HTTPException as exc:
            msg = f"no such path {request.path[:60]!r}; use {ROUTES}" if exc.status == 404 else exc.reason
            resp = _json(exc.status, {"error": msg})
        counter.labels(code=str(resp.status)).inc()
        return resp

    coalescer = Coalescer(backend.score_items)

    async def score(request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        body = await _read_body(request, max_body_bytes)
        code, obj = await coalescer.score(parse_request(body))
        if code == 200:
            backend.http_latency.observe(time.perf_counter() - t0)
        return _json(code, obj)

    async def score_batch(request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        body = await _read_body(request, max_batch_bytes)
        code, obj = backend.http_score_batch(body)
        if code == 200:
            backend.http_batch_latency.observe(time.perf_counter() - t0)
        return _json(code, obj)

    async def livez(request: web.Request) -> web.Response:
        return _json(200, {"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        m = backend.model  # set only once a version has loaded and verified
        if m is None:
            return _json(503, {"status": "no model", "model_version": None})
        return _json(200, {"status": "ready", "model_version": m.version})

    app = web.Application(middlewares=[json_errors])
    app.router.add_post("/score", score)
    app.router.add_post("/score/batch", score_batch)
    app.router.add_get("/livez", livez)
    app.router.add_get("/healthz", livez)
    app.router.add_get("/readyz", readyz)
    return app


class HttpServer:
    """The endpoint served from its own thread and event loop; ``server_address`` once started."""

    def __init__(self, app: web.Application, host: str, port: int, access_log: bool = True,
                 use_uvloop: bool = True, access_log_class: type[AbstractAccessLogger] = AccessLog) -> None:
        self.app = app
        self.host, self.port = host, port
        self.access_log = access_log
        self.access_log_class = access_log_class
        self.server_address: tuple[str, int] = (host, port)
        self._loop = new_event_loop(use_uvloop)
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="scorer-http", daemon=True)

    def start(self) -> HttpServer:
        """Bind and serve; returns once listening (raises ``OSError`` if the port is taken)."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        log = logging.getLogger(ACCESS_LOG) if self.access_log else None
        runner = web.AppRunner(self.app, access_log=log, access_log_class=self.access_log_class,
                               access_log_format=ACCESS_LOG_FORMAT, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True, shutdown_timeout=3.0)
        await site.start()
        self._runner = runner
        sockets = [s for srv in [site._server] if srv is not None for s in getattr(srv, "sockets", ())]
        if sockets:
            self.server_address = sockets[0].getsockname()[:2]

    def shutdown(self) -> None:
        """Stop accepting, finish in-flight requests (up to 3 s), stop the loop."""
        if self._runner is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
            self._runner = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)


def serve_http(backend: Backend, host: str, port: int, *, access_log: bool = True,
               max_batch_bytes: int = 4 << 20, use_uvloop: bool = True) -> HttpServer:
    """Start the endpoint in its own thread; returns the server (``server_address``, ``shutdown``)."""
    app = build_app(backend, max_batch_bytes=max_batch_bytes)
    return HttpServer(app, host, port, access_log=access_log, use_uvloop=use_uvloop).start()
