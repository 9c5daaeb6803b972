"""The web page at `/` (and at `/jobs/<id>`, a job's own address on it): three static files and
`/config.json`, with headers that lock the page down; and the API documentation (`/docs`, `/redoc`), whose assets come from a package, not a CDN.

The files are read once at start and served from memory with an ETag (the GZip middleware
compresses them); the Content-Security-Policy allows no inline script or style and lets the
page talk only to this origin and the notifier's WebSocket.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from importlib import resources
from urllib.parse import urlsplit

import fastapi_offline
import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript", "app.css": "text/css"}
PATHS = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js", "/app.css": "app.css"}
DOCS_ASSETS = "/docs/assets"
# A job's address on the page: the page itself, which opens the job (ids as events.JOB_ID allows them).
JOB_PAGE = "/jobs/{job_id}"
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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

    def job_page(job_id: str, request: Request) -> Response:
        # Whether the job exists, and whose it is, the page asks the API with the key it holds.
        if not JOB_ID.match(job_id):
            return Response("no such page", status_code=404, media_type="text/plain", headers=headers)
        return serve("index.html", request)

    app.add_api_route(JOB_PAGE, job_page, methods=["GET", "HEAD"], include_in_schema=False)


def add_api_docs(app: FastAPI) -> None:
    """Swagger UI at `/docs` and ReDoc at `/redoc`, their scripts served from the fastapi-offline package."""
    assets = resources.files(fastapi_offline) / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + oauth2_redirect_url,
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_api_route("/docs", swagger_ui, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
    app.add_api_route(oauth2_redirect_url, oauth2_redirect, methods=["GET"], include_in_schema=False)
