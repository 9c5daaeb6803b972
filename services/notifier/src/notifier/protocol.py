"""uvicorn's sans-I/O WebSocket protocol, tuned for many mostly idle connections.

- permessage-deflate (when the client offers it) compresses only frames of at
  least `deflate_min_bytes`; smaller ones go out uncompressed, which RFC 7692
  allows message by message. Clients are asked not to keep compression context
  (their messages are rare and tiny), and zlib state is allocated on first use,
  so a connection that only gets small frames holds none.
- A write that waits longer than `send_timeout_s` for a full socket buffer drops
  the connection: a client that reads nothing cannot be sent a close frame.
- Bytes of data frames on the wire (after compression) are counted.
- What clients send (frames, and the loss of a connection) is handled in turns
  of at most `intake_turn_s` per event-loop iteration (`Intake`); the rest waits,
  in order, for the next iterations. When thousands of clients leave at once,
  the event loop reads all their close frames in one poll: handled there and
  then, with the teardown of each session they set off, they stopped every
  other client for 0.6-1 s (bench/notifier.py's loop-lag probe), and the
  collector's young generation grew to ~100,000 objects meanwhile, since the
  connections freed by reference counting offset the allocations that would
  have started a young collection.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import PerMessageDeflate, ServerPerMessageDeflateFactory
from websockets.frames import CTRL_OPCODES, Frame, Opcode
from websockets.server import ServerProtocol
from websockets.typing import ExtensionParameter

from stemflow_shared import metrics

from .settings import Settings

log = logging.getLogger(__name__)

# A 1 KB window and a small hash table: about 14 KB of zlib state per client that gets a compressed frame,
# and batches of job events still shrink about sixfold with the history kept between frames.
WINDOW_BITS = 10
MEM_LEVEL = 3


class LargeFrameDeflate(PerMessageDeflate):
    """permessage-deflate that leaves messages under `min_size` bytes uncompressed."""

    def __init__(self, base: PerMessageDeflate, min_size: int) -> None:
        super().__init__(
            base.remote_no_context_takeover,
            base.local_no_context_takeover,
            base.remote_max_window_bits,
            base.local_max_window_bits,
            base.compress_settings,
        )
        self.min_size = min_size
        self.__dict__.pop("encoder", None)
        self.__dict__.pop("decoder", None)

    def encode(self, frame: Frame) -> Frame:
        if frame.opcode in CTRL_OPCODES:
            return frame
        if frame.opcode is not Opcode.CONT and frame.fin and len(frame.data) < self.min_size:
            return frame
        if not self.local_no_context_takeover and "encoder" not in self.__dict__:
            self.encoder = zlib.compressobj(wbits=-self.local_max_window_bits, **self.compress_settings)
        return super().encode(frame)

    def decode(self, frame: Frame, *, max_size: int | None = None) -> Frame:
        if frame.rsv1 and not self.remote_no_context_takeover and "decoder" not in self.__dict__:
            self.decoder = zlib.decompressobj(wbits=-self.remote_max_window_bits)
        return super().decode(frame, max_size=max_size)


class LargeFrameDeflateFactory(ServerPerMessageDeflateFactory):
    """Negotiates permessage-deflate and hands out `LargeFrameDeflate`."""

    def __init__(self, min_size: int, context_takeover: bool) -> None:
        super().__init__(
            server_no_context_takeover=not context_takeover,
            client_no_context_takeover=True,
            server_max_window_bits=WINDOW_BITS,
            client_max_window_bits=WINDOW_BITS,
            compress_settings={"memLevel": MEM_LEVEL},
        )
        self.min_size = min_size

    def process_request_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension]
    ) -> tuple[list[ExtensionParameter], PerMessageDeflate]:
        response, extension = super().process_request_params(params, accepted_extensions)
        return response, LargeFrameDeflate(extension, self.min_size)


class CountingServerProtocol(ServerProtocol):
    """websockets' server protocol that counts the bytes of data frames it serializes."""

    def send_frame(self, frame: Frame) -> None:
        super().send_frame(frame)
        if frame.opcode not in CTRL_OPCODES:
            metrics.WS_BYTES_SENT.inc(len(self.writes[-1]))


class Intake:
    """What the clients of one server send, handled in turns of at most `turn_s` per event-loop iteration.

    A connection whose input arrives once this iteration's turn is spent (or while others wait) keeps it in its
    backlog and queues up; the queue is worked off turn by turn, oldest first, each turn ending the iteration
    it runs in, so that timers, batches and other clients' frames come in between. One connection's input stays
    in order: its frames, then its loss.
    """

    __slots__ = ("_draining", "_queue", "_turn_ends", "_turn_s", "deferred")

    def __init__(self, turn_s: float) -> None:
        self.deferred = 0  # connections whose input had to wait for a later turn, so far
        self._turn_s = turn_s
        self._turn_ends: float | None = None
        self._queue: deque[NotifierWebSocketProtocol] = deque()
        self._draining = False

    def admits(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether input that has just arrived may be handled now."""
        if self._queue:
            return False
        now = perf_counter()
        if self._turn_ends is None:
            self._turn_ends = now + self._turn_s
            loop.call_soon(self._end_turn)  # after this iteration's I/O callbacks
        return now < self._turn_ends

    def defer(self, protocol: NotifierWebSocketProtocol, loop: asyncio.AbstractEventLoop) -> None:
        self.deferred += 1
        self._queue.append(protocol)
        if not self._draining:
            self._draining = True
            loop.call_soon(self._drain, loop)

    def __len__(self) -> int:
        return len(self._queue)

    def _end_turn(self) -> None:
        self._turn_ends = None

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        ends, queue = perf_counter() + self._turn_s, self._queue
        while queue and perf_counter() < ends:
            protocol = queue.popleft()
            try:
                protocol.catch_up()
            except Exception:  # as the event loop would have logged it, had it called the protocol itself
                log.exception("WebSocket input not handled")
                protocol.transport.abort()
        if queue:
            loop.call_soon(self._drain, loop)  # the next iteration, after its timers and I/O
        else:
            self._draining = False


class NotifierWebSocketProtocol(WebSocketsSansIOProtocol):
    """The sans-I/O protocol with large-frame compression, a write deadline, byte counting and input taken in
    turns (`Intake`)."""

    def __init__(
        self,
        *args: Any,
        deflate_min_bytes: int,
        context_takeover: bool,
        send_timeout_s: float,
        intake: Intake,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        extensions = [LargeFrameDeflateFactory(deflate_min_bytes, context_takeover)]
        self.conn = CountingServerProtocol(
            extensions=extensions if self.config.ws_per_message_deflate else [],
            max_size=self.config.ws_max_size,
            logger=logging.getLogger("uvicorn.error"),
        )
        self.send_timeout_s = send_timeout_s
        self.intake = intake
        # Input not handled yet, in order: bytes received, then (exc,) for the connection lost.
        self.backlog: list[bytes | tuple[Exception | None]] | None = None
        self._held_reading = False

    def data_received(self, data: bytes) -> None:
        if self.backlog is not None:
            self.backlog.append(data)
            if not self._held_reading and not self.transport.is_closing():
                self._held_reading = True  # one chunk waits already: no more until it is handled
                self.transport.pause_reading()
        elif self.intake.admits(self.loop):
            super().data_received(data)
        else:
            self.backlog = [data]
            self.intake.defer(self, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.backlog is not None:
            self.backlog.append((exc,))
        elif self.intake.admits(self.loop):
            super().connection_lost(exc)
        else:
            self.backlog = [(exc,)]
            self.intake.defer(self, self.loop)

    def catch_up(self) -> None:
        """Handle the input that waited for its turn."""
        backlog, self.backlog = self.backlog or [], None
        for item in backlog:
            if isinstance(item, tuple):
                super().connection_lost(item[0])
            elif not self.disconnected:
                super().data_received(item)
        if self._held_reading:
            self._held_reading = False
            if not self.read_paused and not self.transport.is_closing():
                self.transport.resume_reading()

    async def send(self, message: Any) -> None:
        if not self.writable.is_set():
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await self.writable.wait()
            except TimeoutError:
                self.transport.abort()
                raise ClientDisconnected() from None
        await super().send(message)


def websocket_protocol(settings: Settings) -> Callable[..., NotifierWebSocketProtocol]:
    """What uvicorn's `ws` option takes: a factory of the notifier's WebSocket protocol."""
    return functools.partial(
        NotifierWebSocketProtocol,
        deflate_min_bytes=settings.deflate_min_bytes,
        context_takeover=settings.deflate_context_takeover,
        send_timeout_s=settings.send_timeout_s,
        intake=Intake(settings.intake_turn_ms / 1000.0),
    )
