"""``bench serve``'s load client (bench/serve.py): an open-loop keep-alive load against a real aiohttp
server on loopback, answers counted by status, latency from the scheduled time."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from bench.serve import _load, _ratios
from stream.serve.http import new_event_loop


def _run(handler: Any, path: str, rate: float, seconds: float, connections: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        app = web.Application()
        app.router.add_post("/score", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            return await _load(port, path, [b'{"features": {}}', b'{"features": {"a": "b"}}'], rate, seconds,
                               0.2, connections)
        finally:
            await runner.cleanup()

    loop = new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def test_the_client_issues_the_schedule_and_counts_answers() -> None:
    bodies: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.json_response({"ok": True, "pad": "x" * 3000})  # an answer over several reads

    out = _run(handler, "/score", 200, 1.0, 4)
    assert out["codes"] == {"200": 200} and out["requests"] == 200
    assert out["answered_total"] == len(bodies) == 240  # the warm-up's 40 answered, not measured
    assert set(bodies) == {b'{"features": {}}', b'{"features": {"a": "b"}}'}
    assert 190 <= out["achieved_rps"] <= 210
    assert 0 < out["p50_ms"] <= out["p99_ms"] <= out["p999_ms"] <= out["max_ms"]


def test_a_slow_server_shows_in_the_latency_not_in_fewer_requests() -> None:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.05)  # one connection at 100/s: requests queue behind each other
        return web.json_response({"ok": True})

    out = _run(handler, "/score", 100, 0.5, 1)
    assert out["codes"] == {"200": 50}
    assert out["max_ms"] > 1000  # 70 requests x 50 ms on one connection: the queue is measured


def test_other_statuses_are_counted_by_code() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})

    out = _run(handler, "/nope", 100, 0.3, 2)  # no such route: aiohttp's 404
    assert out["codes"] == {"404": 30}


def test_ratios_old_over_new() -> None:
    old = {"2000": {"p50_ms": 4.0, "p99_ms": 30.0, "p999_ms": 90.0, "server_cpu_ms_per_request": 0.5}}
    new = {"2000": {"p50_ms": 1.0, "p99_ms": 10.0, "p999_ms": 0.0, "server_cpu_ms_per_request": 0.2}}
    assert _ratios(old, new) == {"2000": {"p50_ms": 4.0, "p99_ms": 3.0, "p999_ms": None,
                                          "server_cpu_ms_per_request": 2.5}}
