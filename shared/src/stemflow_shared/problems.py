"""RFC 9457 problem details, built one way for every service: a stable machine `code` beside the standard members.

The gateway's handlers, the notifier's refusals, the operations endpoints and the HTTP protocol's own
answers (a malformed or too-large request head) all answer through here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.responses import JSONResponse

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://stemflow.dev/problems/"


def problem_body(status: int, code: str, title: str, detail: str = "", **extra: Any) -> dict[str, Any]:
    """The problem document: `type` (from the code), `title`, `status`, `detail`, `code`, then `extra` members."""
    return {
        "type": TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail or title,
        "code": code,
        **extra,
    }


def problem_response(
    status: int, code: str, title: str, detail: str = "", *, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The problem as a Starlette response (nosniff, as every API answer)."""
    return JSONResponse(
        problem_body(status, code, title, detail, **extra),
        status_code=status,
        headers={**(headers or {}), "X-Content-Type-Options": "nosniff"},
        media_type=MEDIA_TYPE,
    )


def raw_problem(status: int, reason: str, code: str, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole `connection: close` HTTP/1.1 answer with the problem as its body (for a protocol's own errors)."""
    body = json.dumps(problem_body(status, code, reason, detail)).encode()
    head = [b"HTTP/1.1 %d %s\r\n" % (status, reason.encode())]
    head += [name + b": " + value + b"\r\n" for name, value in headers]
    head.append(
        b"content-type: " + MEDIA_TYPE.encode() + b"\r\nx-content-type-options: nosniff\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    )
    return b"".join(head) + body
