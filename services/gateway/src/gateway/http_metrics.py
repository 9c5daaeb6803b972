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

import asyncio
import logging
import time
from typing import Any

from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stemflow_shared import metrics
from stemflow_shared.health import PROBLEM_HANDLERS, metrics_routes
from stemflow_shared.httpserver import READ_TIMEOUT_SCOPE_KEY, HttpLimits, http_server, listening_socket

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


class MetricsPort:
    """Serves /metrics on a port of its own while the app runs, so that the API port does not.

    The server starts with the app's lifespan (a port that cannot be bound fails the start) and runs in
    the same event loop, reading the same registry. With several server processes (HTTP_WORKERS) each
    binds the port with SO_REUSEPORT, so a scrape reaches one of them, as it did on the API port.
    """

    def __init__(self, app: ASGIApp, host: str, port: int, reuse_port: bool, limits: HttpLimits) -> None:
        self.app = app
        self.host, self.port, self.reuse_port, self.limits = host, port, reuse_port, limits
        self.bound_port: int | None = None  # the port once started (`port` may be 0: any free one)
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._start()
            elif message["type"] == "lifespan.shutdown":
                await self._stop()
            return message

        await self.app(scope, lifespan_receive, send)

    async def _start(self) -> None:
        sock = listening_socket(self.host, self.port, reuse_port=self.reuse_port)
        app = Starlette(routes=metrics_routes(), exception_handlers=PROBLEM_HANDLERS)
        self._server = http_server(app, self.host, self.port, self.limits, lifespan="off")
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        self.bound_port = sock.getsockname()[1]
        log.info("metrics on port %d", self.bound_port)

    async def _stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, 5)
        except TimeoutError:
            log.warning("the metrics server did not stop within 5 s")
