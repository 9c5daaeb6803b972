"""Cached job reads: hits of `GET /v1/jobs/{id}` answered in front of FastAPI's routing and dependencies.

Clients poll their jobs, so this is the gateway's most frequent call, and for a
cached job the framework cost more than the work. Only a hit for the key's own
job (200 or 304) and an over-limit key (429) are answered here; everything else
goes on to the route, which then neither counts the request against the rate
limit again nor reads the cache a second time.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from stemflow_shared import telemetry
from stemflow_shared.auth import bearer_token

from . import views
from .cache import CachedJob
from .problems import Problem, problem_response
from .ratelimit import COUNTER_TTL_S

JOB_PATH = re.compile(r"/v1/jobs/([0-9a-f]{32})")
# Set in the scope once this request has been counted and the cache held no hit for its key's owner.
LOOKED_UP = "stemflow.cache_looked_up"


class CachedJobReads:
    def __init__(self, app: ASGIApp, route_path: str = "/v1/jobs/{job_id}") -> None:
        self.app = app
        self._route = _RouteLabel(route_path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = JOB_PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "GET" else None
        if match is None or not await self._answered(scope, send, match.group(1)):
            await self.app(scope, receive, send)

    async def _answered(self, scope: Scope, send: Send, job_id: str) -> bool:
        state = scope["app"].state
        headers = dict(scope["headers"])
        who = await state.api_keys.authenticate(bearer_token(headers.get(b"authorization", b"").decode("latin-1")))
        if who is None:
            return False
        gzip_ok = b"gzip" in headers.get(b"accept-encoding", b"")
        cached, count = await state.jobs.cache.get(
            job_id, gzip_ok=gzip_ok, counter_key=state.limiter.counter_key(who), counter_ttl_s=COUNTER_TTL_S
        )
        scope[LOOKED_UP] = True
        scope["route"] = self._route
        telemetry.name_server_span("GET", self._route.path)
        try:
            state.limiter.enforce(count)
        except Problem as problem:
            await problem_response(problem, scope["path"])(scope, _no_body, send)
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


class _RouteLabel:
    """Stands for the route in the scope, so metrics label these answers with its template."""

    def __init__(self, path: str) -> None:
        self.path = path


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _no_body() -> Any:
    return {"type": "http.request", "body": b"", "more_body": False}
