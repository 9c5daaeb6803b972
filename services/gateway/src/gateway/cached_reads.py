"""Cached reads answered in front of FastAPI's routing and dependencies: hits of `GET /v1/jobs/{id}` and of
the owner's cached pages of `GET /v1/jobs` (first and cursor pages).

Clients poll their jobs and their lists, so these are the gateway's most frequent
calls, and for a cached answer the framework cost more than the work. Only a hit
(a job of the key's own: 200 or 304; a cached page) and an over-limit key (429)
are answered here; everything else goes on to the route, which then neither counts
the request against the rate limit again nor reads the cache a second time. A list
query this does not read exactly as the route would (an unknown or repeated
parameter, a value the route refuses, a cursor that is not one of ours) goes to
the route as it came.
"""

from __future__ import annotations

import re
from typing import Any, get_args
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from stemflow_shared import telemetry
from stemflow_shared.auth import bearer_token
from stemflow_shared.events import JobStatus

from . import views
from .cache import CachedJob
from .problems import Problem, problem_response
from .ratelimit import COUNTER_TTL_S
from .repository import decode_cursor

JOB_PATH = re.compile(r"/v1/jobs/([0-9a-f]{32})")
LIST_PATH = "/v1/jobs"
# Set in the scope once this request has been counted and the cache held no hit for its key's owner.
LOOKED_UP = "stemflow.cache_looked_up"
# Set in the scope of a list request counted here whose page was not cached: the miss, with its generation.
PAGE_MISS = "stemflow.page_miss"
# The list's parameters as the route declares them: `limit` 1..1000 (default 20), `status` one of JobStatus.
LIST_DEFAULT_LIMIT, LIST_MAX_LIMIT = 20, 1000
_STATUSES = frozenset(get_args(JobStatus))


class CachedJobReads:
    def __init__(self, app: ASGIApp, route_path: str = "/v1/jobs/{job_id}") -> None:
        self.app = app
        self._route = _RouteLabel(route_path)
        self._list_route = _RouteLabel(LIST_PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            if path == LIST_PATH:
                query = page_query(scope["query_string"])
                if query is not None and await self._answered_list(scope, send, *query):
                    return
            elif (match := JOB_PATH.fullmatch(path)) is not None and await self._answered(scope, send, match.group(1)):
                return
        await self.app(scope, receive, send)

    async def _answered_list(self, scope: Scope, send: Send, status: str | None, limit: int, after: str | None) -> bool:
        state, headers = scope["app"].state, dict(scope["headers"])
        who = await _caller(state, headers)
        if who is None:
            return False
        page, count = await state.jobs.cached_page(
            who.owner,
            status=status,
            limit=min(limit, state.settings.list_max_limit),
            after=after,
            gzip_ok=b"gzip" in headers.get(b"accept-encoding", b""),
            counter_key=state.limiter.counter_key(who),
        )
        scope[PAGE_MISS] = page
        if await _refused(scope, send, self._list_route, count):
            return True
        if page.body is None:
            return False
        await _send(send, 200, page_headers(page.body, page.gzipped), page.body)
        return True

    async def _answered(self, scope: Scope, send: Send, job_id: str) -> bool:
        state, headers = scope["app"].state, dict(scope["headers"])
        who = await _caller(state, headers)
        if who is None:
            return False
        gzip_ok = b"gzip" in headers.get(b"accept-encoding", b"")
        cached, count = await state.jobs.cache.get(
            job_id, gzip_ok=gzip_ok, counter_key=state.limiter.counter_key(who), counter_ttl_s=COUNTER_TTL_S
        )
        scope[LOOKED_UP] = True
        if await _refused(scope, send, self._route, count):
            return True
        if cached is None or cached.owner != who.owner:
            return False
        if_none_match = headers.get(b"if-none-match")
        status, answer_headers, body = job_answer(
            job_id, cached, if_none_match.decode("latin-1") if if_none_match is not None else None
        )
        raw = [(name.encode(), value.encode()) for name, value in answer_headers]
        if status == 200:
            raw.append((b"content-length", str(len(body)).encode()))
        await _send(send, status, raw, body)
        return True


def job_answer(job_id: str, job: CachedJob, if_none_match: str | None) -> tuple[int, list[tuple[str, str]], bytes]:
    """The answer to `GET /v1/jobs/{id}` for the key's own job: 304 when its ETag matches, else the body.

    Both this middleware (cache hits) and the route (everything else) answer through here.
    """
    tag = views.etag(job_id, job.version)
    if if_none_match is not None and tag in {t.strip() for t in if_none_match.split(",")}:
        return 304, [("etag", tag), ("vary", "accept-encoding")], b""
    headers = [
        ("content-type", "application/json"),
        ("etag", tag),
        ("cache-control", "private, no-cache"),
        ("vary", "accept-encoding"),
    ]
    if job.gzipped:
        headers.append(("content-encoding", "gzip"))
    return 200, headers, job.body


async def _caller(state: Any, headers: dict[bytes, bytes]) -> Any:
    """The API key's principal, or None (the route then answers 401 as it always does)."""
    return await state.api_keys.authenticate(bearer_token(headers.get(b"authorization", b"").decode("latin-1")))


async def _refused(scope: Scope, send: Send, route: _RouteLabel, count: int) -> bool:
    """Label the request with its route (metrics, the server span) and answer 429 if its key is over the limit."""
    scope["route"] = route
    telemetry.name_server_span("GET", route.path)
    try:
        scope["app"].state.limiter.enforce(count)
    except Problem as problem:
        await problem_response(problem, scope["path"])(scope, _no_body, send)
        return True
    return False


def page_query(query_string: bytes) -> tuple[str | None, int, str | None] | None:
    """(status, limit, the job id the page starts after) of a list query, read exactly as the route reads it;
    None for anything else (an unknown, repeated or refused parameter), which the route then answers itself."""
    status, limit, after, seen = None, LIST_DEFAULT_LIMIT, None, set()
    try:
        pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, strict_parsing=bool(query_string))
    except ValueError:
        return None
    for name, value in pairs:
        if name in seen:
            return None
        seen.add(name)
        if name == "status" and value in _STATUSES:
            status = value
        elif name == "limit" and value.isascii() and value.isdigit() and 1 <= int(value) <= LIST_MAX_LIMIT:
            limit = int(value)
        elif name == "cursor" and value:
            try:
                after = decode_cursor(value)
            except ValueError:
                return None
        else:
            return None
    return status, limit, after


def page_headers(body: bytes, gzipped: bool) -> list[tuple[bytes, bytes]]:
    """A list page's headers, the same here and in the route (a gzipped page says so, with its Vary)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if gzipped:
        headers += [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")]
    return headers


class _RouteLabel:
    """Stands for the route in the scope, so metrics label these answers with its template."""

    def __init__(self, path: str) -> None:
        self.path = path


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _no_body() -> Any:
    return {"type": "http.request", "body": b"", "more_body": False}
