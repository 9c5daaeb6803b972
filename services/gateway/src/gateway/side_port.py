"""A second listener beside the API's: an app of its own served on another port while the gateway runs.

The gateway serves /metrics (http_metrics.MetricsPort) and its internal API (internal.InternalPort) this
way, so neither is reachable on the public API port. The server starts with the gateway's lifespan (a
port that cannot be bound fails the start), runs in the same event loop, and stops at shutdown. With
several server processes (HTTP_WORKERS) each binds the port with SO_REUSEPORT.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stemflow_shared.httpserver import HttpLimits, http_server, listening_socket

log = logging.getLogger(__name__)


class SidePort:
    """ASGI middleware that serves `side_app()` on (host, port) for as long as the wrapped app's lifespan runs."""

    name = "side"
    # True: start once the app's startup has completed (the side app reads state the startup makes).
    after_startup = False

    def __init__(self, app: ASGIApp, host: str, port: int, reuse_port: bool, limits: HttpLimits) -> None:
        self.app = app
        self.host, self.port, self.reuse_port, self.limits = host, port, reuse_port, limits
        self.bound_port: int | None = None  # the port once started (`port` may be 0: any free one)
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    def side_app(self) -> ASGIApp:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup" and not self.after_startup:
                await self._start()
            elif message["type"] == "lifespan.shutdown":
                await self._stop()
            return message

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and self.after_startup:
                await self._start()
            await send(message)

        await self.app(scope, lifespan_receive, lifespan_send)

    async def _start(self) -> None:
        sock = listening_socket(self.host, self.port, reuse_port=self.reuse_port)
        self._server = http_server(self.side_app(), self.host, self.port, self.limits, lifespan="off")
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        self.bound_port = sock.getsockname()[1]
        log.info("%s on port %d", self.name, self.bound_port)

    async def _stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, 5)
        except TimeoutError:
            log.warning("the %s server did not stop within 5 s", self.name)
