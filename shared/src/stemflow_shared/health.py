"""The health and metrics endpoints every service serves: /healthz, /readyz and /metrics (servers: httpserver.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import metrics
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


def health_routes(
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
    return [route for route in health_routes({}) if route.path == "/metrics"]


async def http_problem(request: Request, exc: Exception) -> Response:
    """Starlette's HTTP errors (404, 405) as RFC 9457 problem+json."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else code
    return problem_response(exc.status_code, code, detail, detail, headers=exc.headers)


PROBLEM_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {HTTPException: http_problem}


def health_app(checks: Mapping[str, Check]) -> Starlette:
    return Starlette(routes=health_routes(checks), exception_handlers=PROBLEM_HANDLERS)
