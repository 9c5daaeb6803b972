"""What every answer of the API carries, and `OPTIONS`: `X-Content-Type-Options: nosniff` on every response,
`OPTIONS <path>` answered `204` with an `Allow` header listing every method of the path (a `405` lists them
all too: Starlette names only those of the first route it tried).

Pure ASGI, like `observe.Observe`; it runs outside the cached read path so that those answers get the header.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

NOSNIFF = (b"x-content-type-options", b"nosniff")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(router: Any, scope: Scope) -> list[str]:
    """Every method some route serves at the request's path (OPTIONS included when any), asking the routes
    themselves (FastAPI's included routers only say through `matches`)."""
    methods = set()
    for method in METHODS:
        probe = {**scope, "method": method}
        if any(route.matches(probe)[0] is Match.FULL for route in router.routes):
            methods.add(method)
    return sorted(methods | {"OPTIONS"}) if methods else []


class Edge:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            methods = allowed_methods(scope["app"].router, scope)
            if methods:
                await send({"type": "http.response.start", "status": 204, "headers": [*_allow(methods), NOSNIFF]})
                await send({"type": "http.response.body", "body": b""})
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name.lower() == NOSNIFF[0] for name, _ in headers):
                    headers.append(NOSNIFF)
                if message["status"] == 405:
                    methods = allowed_methods(scope["app"].router, scope)
                    headers = [(k, v) for k, v in headers if k.lower() != b"allow"] + _allow(methods)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _allow(methods: list[str]) -> list[tuple[bytes, bytes]]:
    return [(b"allow", ", ".join(methods).encode())]
