"""uvicorn's httptools protocol with limits on the request head, for the services' public HTTP servers.

httptools (llhttp) buffers a header of any size and any number of headers, so one request could
make a server hold megabytes before any application code sees it. This protocol counts the bytes of
each request head as they arrive and its header lines as they are parsed; past either limit the
request is answered `431` (problem+json) and the connection is closed. Use it with
`uvicorn.run(..., http="stemflow_shared.httpserver:LimitedHttpToolsProtocol")`.
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
_END_OF_HEAD = b"\r\n\r\n"


def _refusal(detail: str) -> bytes:
    body = json.dumps(
        {
            "type": "https://stemflow.dev/problems/headers_too_large",
            "title": "Request Header Fields Too Large",
            "status": 431,
            "detail": detail,
            "code": "headers_too_large",
        }
    ).encode()
    head = (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: application/problem+json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    )
    return head + body


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a refused request."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = MAX_HEAD_BYTES
    max_headers = MAX_HEADERS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            end = data.find(_END_OF_HEAD)
            self._head_bytes += len(data) if end < 0 else end
            if self._head_bytes > self.max_head_bytes:
                self._refuse(f"the request head is over {self.max_head_bytes} bytes")
                return
            if end >= 0:
                self._in_head = False
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        # Raising in a parser callback (to stop parsing a refused request) lands here; the 431 is already sent.
        if not self._refused:
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        self._header_count = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers:
            self._refuse(f"a request may have at most {self.max_headers} header lines")
            # Stops the parser: nothing of this request reaches the application.
            raise _Refused
        super().on_header(name, value)

    def on_message_complete(self) -> None:
        # The next request on this connection starts with a fresh head.
        self._in_head, self._head_bytes = True, 0
        super().on_message_complete()

    def _refuse(self, detail: str) -> None:
        if self._refused:
            return
        self._refused = True
        if not self.transport.is_closing():
            self.transport.write(_refusal(detail))
            self.transport.close()
