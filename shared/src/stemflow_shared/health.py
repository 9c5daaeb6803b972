"""The operations endpoints every service serves: /healthz, /readyz and /metrics, and their HTTP server."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import metrics
from .httpserver import HttpLimits, server_options
from .problems import problem_response

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[bool]]


async def run_checks(checks: Mapping[str, Check], timeout_s: float = 2.0) -> dict[str, bool]:
    """Run readiness checks concurrently; a check that raises or hangs counts as failed."""

    async def one(check: Check) -> bool:
        try:
            return bool(await asyncio.wait_for(check(), timeout_s))
        except Exception:
            return False

    results = await asyncio.gather(*(one(c) for c in checks.values()))
    return dict(zip(checks, results, strict=True))


def ops_routes(
    checks: Mapping[str, Check] | Callable[[Request], Mapping[str, Check]], *, with_metrics: bool = True
) -> list[Route]:
    """/healthz, /readyz and (unless served on a port of its own) /metrics; checks may be resolved per request."""

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        results = await run_checks(checks(request) if callable(checks) else checks)
        ok = all(results.values())
        body = {"status": "ready" if ok else "not ready", "checks": results}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_endpoint(_: Request) -> Response:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    routes = [Route("/healthz", healthz), Route("/readyz", readyz)]
    return [*routes, Route("/metrics", metrics_endpoint)] if with_metrics else routes


def metrics_routes() -> list[Route]:
    """/metrics alone, for a port of its own."""
    return [route for route in ops_routes({}) if route.path == "/metrics"]


async def http_problem(request: Request, exc: Exception) -> Response:
    """Starlette's HTTP errors (404, 405) as RFC 9457 problem+json."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else code
    return problem_response(exc.status_code, code, detail, detail, headers=exc.headers)


PROBLEM_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {HTTPException: http_problem}


def ops_app(checks: Mapping[str, Check]) -> Starlette:
    return Starlette(routes=ops_routes(checks), exception_handlers=PROBLEM_HANDLERS)


def http_server(
    app: object, host: str, port: int, limits: HttpLimits | None = None, *, lifespan: str = "on"
) -> uvicorn.Server:
    """A uvicorn server to run inside the service's own event loop, with the HTTP limits of `limits`
    (by default read from the environment: HTTP_HEAD_TIMEOUT_S and the others of `HttpLimits`)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan=lifespan,
        **server_options(limits or HttpLimits()),
    )
    server = uvicorn.Server(config)
    # The service installs its own signal handlers and tells the server when to stop.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    return server


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket for `uvicorn.Server.serve(sockets=...)`; with `reuse_port`, several processes
    (the gateway's HTTP_WORKERS) can each serve the same port, the kernel spreading connections among them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock
