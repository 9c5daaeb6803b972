"""uvicorn's httptools protocol with limits on slow and oversized requests, for every service's HTTP server.

- The request head: its bytes are counted as they arrive and its header lines as they are parsed
  (httptools buffers a header of any size); past either limit the request is answered `431`.
- Time: a connection must send a whole request head within `head_timeout_s` of its first byte (or of
  opening), and its body may not stall for `body_timeout_s`; otherwise it is answered `408` (nothing
  when it sent nothing) and closed. Time the server itself spends (the application working, reading
  paused because the application is behind) never counts against the client.
- Keep-alive: idle connections stay open `keep_alive_s` (longer than clients' pools keep them: a server
  that closes first races the client's next request), at most `max_idle_connections` of them; past
  that the longest idle are closed.
- Errors uvicorn answers itself (a malformed request) are problem+json like the services' own.

Use it with `uvicorn.Config(..., http=limited_http(limits), timeout_keep_alive=limits.http_keep_alive_s)`.
"""

from __future__ import annotations

import functools
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import uvicorn
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .problems import raw_problem

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
# Set in a request's scope when its body timed out, so that metrics can tell it from a client that left.
READ_TIMEOUT_SCOPE_KEY = "stemflow.read_timeout"


class HttpLimits(BaseSettings):
    """How long and how much an HTTP server waits for its clients, from the environment (HTTP_*)."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    http_head_timeout_s: float = Field(
        default=10.0, gt=0, description="A request head must arrive within this long (a new connection too)"
    )
    http_body_timeout_s: float = Field(
        default=30.0, gt=0, description="A request body may pause this long between two reads"
    )
    http_keep_alive_s: float = Field(
        default=75.0, gt=0, description="Idle keep-alive connections are kept this long (more than clients' pools)"
    )
    http_max_idle_connections: int = Field(
        default=1000, ge=1, description="Idle keep-alive connections kept per process; past it the oldest close"
    )


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a refused request."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = MAX_HEAD_BYTES
    max_headers = MAX_HEADERS

    def __init__(
        self,
        *args: Any,
        head_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
        max_idle_connections: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_idle_connections = max_idle_connections
        # A head is being read from the first byte after the previous message until its headers are complete.
        self._reading_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._refused = False
        # One watchdog timer per connection, moved lazily: the phase's deadline is a float that each read
        # pushes back; the timer, when it fires early, re-arms itself for what is left.
        self._phase = "new"  # new, head, body, app
        self._deadline: float | None = None
        self._watchdog: Any = None

    # --- connection life --------------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect("new", self.head_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._idle().pop(self, None)
        self._deadline = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._idle().pop(self, None)
        # A head is fed at most up to its byte limit at a time, so that an oversized one is refused before
        # the parser buffers it; a body is fed whole.
        while data and not self.transport.is_closing():
            if self._reading_head:
                room = self.max_head_bytes - self._head_bytes
                if room <= 0:
                    self._refuse(f"the request head is over {self.max_head_bytes} bytes")
                    return
                piece, data = data[:room], data[room:]
                self._head_bytes += len(piece)
            else:
                piece, data = data, b""
            super().data_received(piece)
            if self.parser is None or self.transport.get_protocol() is not self:
                return  # closed, or upgraded to a WebSocket: the rest is not HTTP

    def handle_websocket_upgrade(self) -> None:
        """Hand the connection to the WebSocket protocol, then let go of this one at once.

        Its parser holds its callbacks (a cycle) and its read watchdog holds it until the timer fires: left
        alone, an upgraded connection's HTTP protocol lives on for seconds, then becomes cyclic garbage, which a
        service that freezes what lives long (the notifier: notifier.heap) would never collect. Cancelling the
        watchdog and dropping the parser frees it by reference counting.
        """
        self._deadline = None
        super().handle_websocket_upgrade()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.parser = None  # type: ignore[assignment]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None and not self.transport.is_closing():
            idle = self._idle()
            idle[self] = None
            while len(idle) > self.max_idle_connections:
                oldest, _ = idle.popitem(last=False)
                oldest.transport.close()

    def _idle(self) -> OrderedDict[LimitedHttpToolsProtocol, None]:
        """This server's idle keep-alive connections, longest idle first."""
        idle = getattr(self.server_state, "stemflow_idle", None)
        if idle is None:
            idle = OrderedDict()
            self.server_state.stemflow_idle = idle  # type: ignore[attr-defined]
        return idle

    # --- parser callbacks -------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._header_count = 0
        self._expect("head", self.head_timeout_s)
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers:
            self._refuse(f"a request may have at most {self.max_headers} header lines")
            # Stops the parser: nothing of this request reaches the application.
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head, self._head_bytes = False, 0
        self._expect("body", self.body_timeout_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._deadline = self.loop.time() + self.body_timeout_s
        super().on_body(body)

    def on_message_complete(self) -> None:
        # The next request on this connection starts with a fresh head; until it does, the server has the turn.
        self._reading_head, self._head_bytes = True, 0
        self._phase, self._deadline = "app", None
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        # Raising in a parser callback (to stop parsing a refused request) lands here; the 431 is already sent.
        if self._refused:
            return
        self._refused = True
        if not self.transport.is_closing():
            answer = raw_problem(400, "Bad Request", "malformed_request", msg, self.server_state.default_headers)
            self.transport.write(answer)
            self.transport.close()

    # --- limits -----------------------------------------------------------------------------------------
    def _refuse(self, detail: str) -> None:
        if self._refused:
            return
        self._refused = True
        if not self.transport.is_closing():
            self.transport.write(raw_problem(431, "Request Header Fields Too Large", "headers_too_large", detail))
            self.transport.close()

    def _expect(self, phase: str, timeout_s: float) -> None:
        self._phase = phase
        self._deadline = deadline = self.loop.time() + timeout_s
        if self._watchdog is None:
            self._watchdog = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if self._deadline is None or self.transport is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._servers_turn():
            self._deadline = now + (self.head_timeout_s if self._phase in ("new", "head") else self.body_timeout_s)
        if now < self._deadline:
            self._watchdog = self.loop.call_at(self._deadline, self._check_deadline)
            return
        self._time_out()

    def _servers_turn(self) -> bool:
        """Whether the connection waits on the server: reading paused (the application is behind, or
        pipelined requests queue), or a response still being made while the next head arrives."""
        if self.flow is not None and self.flow.read_paused:
            return True
        cycle = self.cycle
        return self._phase == "head" and cycle is not None and not cycle.response_complete

    def _time_out(self) -> None:
        self._refused = True
        if self._phase == "new":
            self.transport.close()  # it sent nothing: there is nobody to answer
            return
        cycle = self.cycle if self._phase == "body" else None
        if cycle is not None:
            if cycle.response_started:
                # Answered already (say an early 413) and the rest of the body never came: just hang up.
                self.transport.close()
                return
            cycle.scope[READ_TIMEOUT_SCOPE_KEY] = True  # type: ignore[literal-required]
            cycle.disconnected = True
            cycle.message_event.set()
        what = "request head" if self._phase == "head" else "request body"
        limit = self.head_timeout_s if self._phase == "head" else self.body_timeout_s
        detail = f"the {what} did not arrive in time ({limit:g} s)"
        self.transport.write(
            raw_problem(408, "Request Timeout", "request_timeout", detail, self.server_state.default_headers)
        )
        self.transport.close()


def limited_http(limits: HttpLimits) -> Callable[..., LimitedHttpToolsProtocol]:
    """What uvicorn's `http` option takes: the limited protocol with these limits (picklable, for workers)."""
    return functools.partial(
        LimitedHttpToolsProtocol,
        head_timeout_s=limits.http_head_timeout_s,
        body_timeout_s=limits.http_body_timeout_s,
        max_idle_connections=limits.http_max_idle_connections,
    )


def server_options(limits: HttpLimits) -> dict[str, Any]:
    """The uvicorn options that apply `limits`: the protocol and the keep-alive time."""
    return {"http": limited_http(limits), "timeout_keep_alive": limits.http_keep_alive_s}


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
