"""The operations endpoints every worker serves: /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import metrics

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


def ops_routes(checks: Mapping[str, Check] | Callable[[Request], Mapping[str, Check]]) -> list[Route]:
    """/healthz, /readyz and /metrics; checks may be resolved per request (built after start-up)."""

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

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
    ]


def ops_app(checks: Mapping[str, Check]) -> Starlette:
    return Starlette(routes=ops_routes(checks))


def http_server(app: object, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server to run inside the service's own event loop."""
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    # The service installs its own signal handlers and tells the server when to stop.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    return server
