"""HTTP metrics: RED metrics of every request with an X-Response-Time header, and /metrics on a port of its
own (MongoDB's slow commands: mongo_monitoring.py).

The HTTP part is pure ASGI rather than Starlette's BaseHTTPMiddleware: that one
runs every response through a task group and a memory stream, which costs more
than a cached job read itself.

A request whose client went away before its answer was sent is counted with
status 499 ("client closed request", as nginx logs it), and one whose body
stopped arriving with 408: neither is a server error, and anyone with a key
could otherwise move the 5xx rate by aborting uploads.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stemflow_shared import metrics
from stemflow_shared.health import PROBLEM_HANDLERS, metrics_routes
from stemflow_shared.httpserver import READ_TIMEOUT_SCOPE_KEY

from .side_port import SidePort

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499
REQUEST_TIMEOUT = 408


class Observe:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._histograms: dict[tuple[str, str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        answered = client_left = False

        async def watched_receive() -> Message:
            nonlocal client_left
            message = await receive()
            if message["type"] == "http.disconnect" and not answered:
                client_left = True
            return message

        async def timed_send(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed_ms = (time.perf_counter() - started) * 1000
                message["headers"] = [*message.get("headers", ()), (b"x-response-time", b"%.2fms" % elapsed_ms)]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        metrics.HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, watched_receive, timed_send)
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
            if client_left:
                status = REQUEST_TIMEOUT if scope.get(READ_TIMEOUT_SCOPE_KEY) else CLIENT_CLOSED_REQUEST
            self._histogram(scope, status).observe(time.perf_counter() - started)

    def _histogram(self, scope: Scope, status: int) -> Any:
        """The labelled histogram child, looked up once per (method, route, status)."""
        template = getattr(scope.get("route"), "path", "unmatched")
        key = (scope["method"], template, status)
        child = self._histograms.get(key)
        if child is None:
            child = metrics.HTTP_REQUEST_DURATION.labels(scope["method"], template, str(status))
            self._histograms[key] = child
        return child


class MetricsPort(SidePort):
    """Serves /metrics on a port of its own while the app runs, so that the API port does not; it reads the
    same registry, and with several server processes a scrape reaches one of them, as it did on the API port."""

    name = "metrics"

    def side_app(self) -> ASGIApp:
        return Starlette(routes=metrics_routes(), exception_handlers=PROBLEM_HANDLERS)
