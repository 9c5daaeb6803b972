"""The web page at `/`: three static files and `/config.json`, with headers that lock the page down.

The files are read once at start and served from memory with an ETag (the GZip middleware
compresses them); the Content-Security-Policy allows no inline script or style and lets the
page talk only to this origin and the notifier's WebSocket.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib import resources
from urllib.parse import urlsplit

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript", "app.css": "text/css"}
PATHS = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js", "/app.css": "app.css"}


def page_headers(events_url: str) -> dict[str, str]:
    ws = urlsplit(events_url)
    return {
        "Content-Security-Policy": (
            f"default-src 'self'; connect-src 'self' {ws.scheme}://{ws.netloc}; img-src 'self' data: blob:; "
            "media-src 'self' blob:; style-src 'self'; script-src 'self'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def add_web_page(app: FastAPI, events_url: str) -> None:
    """Serve the page and its configuration (the notifier's URL) on `app`."""
    static = resources.files("gateway") / "static"
    headers = page_headers(events_url)
    bodies = {name: (static / name).read_bytes() for name in FILES}
    bodies["config.json"] = orjson.dumps({"events_url": events_url})
    etags = {name: '"' + hashlib.sha256(body).hexdigest()[:32] + '"' for name, body in bodies.items()}
    media_types = {**FILES, "config.json": "application/json"}

    def serve(name: str, request: Request) -> Response:
        etag = etags[name]
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={**headers, "ETag": etag})
        return Response(bodies[name], media_type=media_types[name], headers={**headers, "ETag": etag})

    def endpoint_for(name: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            return serve(name, request)

        return endpoint

    for path, name in [*PATHS.items(), ("/config.json", "config.json")]:
        app.add_api_route(path, endpoint_for(name), methods=["GET", "HEAD"], include_in_schema=False)
