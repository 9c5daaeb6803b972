"""Observability: HTTP RED metrics with an X-Response-Time header, and slow MongoDB commands.

The HTTP part is pure ASGI rather than Starlette's BaseHTTPMiddleware: that one
runs every response through a task group and a memory stream, which costs more
than a cached job read itself.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pymongo import monitoring
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stemflow_shared import metrics

log = logging.getLogger("gateway")


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

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed_ms = (time.perf_counter() - started) * 1000
                message["headers"] = [*message.get("headers", ()), (b"x-response-time", b"%.2fms" % elapsed_ms)]
            await send(message)

        metrics.HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, timed_send)
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
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


class SlowCommandLogger(monitoring.CommandListener):
    """Counts and logs MongoDB commands slower than the threshold."""

    def __init__(self, threshold_ms: float) -> None:
        self.threshold_ms = threshold_ms

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        return None

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        millis = event.duration_micros / 1000
        if millis > self.threshold_ms:
            metrics.MONGODB_SLOW_COMMANDS.labels(event.command_name).inc()
            log.warning("slow MongoDB command %s took %.1f ms", event.command_name, millis)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        return None
