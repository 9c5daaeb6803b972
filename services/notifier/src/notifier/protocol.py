"""uvicorn's sans-I/O WebSocket protocol, tuned for many mostly idle connections.

- permessage-deflate (when the client offers it) compresses only frames of at
  least `deflate_min_bytes`; smaller ones go out uncompressed, which RFC 7692
  allows message by message. Clients are asked not to keep compression context
  (their messages are rare and tiny), and zlib state is allocated on first use,
  so a connection that only gets small frames holds none.
- A write that waits longer than `send_timeout_s` for a full socket buffer drops
  the connection: a client that reads nothing cannot be sent a close frame.
- Bytes of data frames on the wire (after compression) are counted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import zlib
from collections.abc import Callable, Sequence
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


class NotifierWebSocketProtocol(WebSocketsSansIOProtocol):
    """The sans-I/O protocol with large-frame compression, a write deadline and byte counting."""

    def __init__(
        self, *args: Any, deflate_min_bytes: int, context_takeover: bool, send_timeout_s: float, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        extensions = [LargeFrameDeflateFactory(deflate_min_bytes, context_takeover)]
        self.conn = CountingServerProtocol(
            extensions=extensions if self.config.ws_per_message_deflate else [],
            max_size=self.config.ws_max_size,
            logger=logging.getLogger("uvicorn.error"),
        )
        self.send_timeout_s = send_timeout_s

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
    )
