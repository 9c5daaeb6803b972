"""The internal API (contract: stemflow_shared.internal): other services ask the owner of job state.

The notifier needs to know whose an API key is, a job's state when a client subscribes, and where a job's
webhook goes. Rather than read the gateway's collections, it asks here: jobs are rendered by the same view
code as the public API, so a change of the job document has one owner.

The routes are served on INTERNAL_PORT by a server of their own beside the API's (as /metrics is on
METRICS_PORT), never on the public port, and every request must carry INTERNAL_TOKEN, compared in
constant time. Without INTERNAL_TOKEN every request is refused.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from pydantic import BaseModel, SecretStr
from starlette.datastructures import State
from starlette.types import ASGIApp

from stemflow_shared import telemetry
from stemflow_shared.auth import bearer_token
from stemflow_shared.httpserver import HttpLimits
from stemflow_shared.internal import (
    ID_PATTERN,
    MAX_JOBS,
    PREFIX,
    BatchRecord,
    JobList,
    JobRecord,
    Principal,
    PrincipalQuery,
)

from . import problems
from .deps import jobs_of, not_found
from .jobs import UNFINISHED
from .problems import Problem
from .side_port import SidePort

log = logging.getLogger(__name__)

JobId = Annotated[str, Path(pattern=ID_PATTERN)]
OwnerQuery = Annotated[str, Query(min_length=1, max_length=200)]


async def service_token(request: Request) -> None:
    """Refuse a request that does not carry the service token."""
    expected: SecretStr | None = request.app.state.settings.internal_token
    given = bearer_token(request.headers.get("authorization"))
    if (
        expected is None
        or given is None
        or not hmac.compare_digest(given.encode(), expected.get_secret_value().encode())
    ):
        raise Problem(401, "unauthorized", "the service token is required", headers={"WWW-Authenticate": "Bearer"})


router = APIRouter(prefix=PREFIX, dependencies=[Depends(service_token)])


@router.get("/ping", status_code=204)
async def ping() -> Response:
    return Response(status_code=204)


@router.post("/principals")
async def principal(query: PrincipalQuery, request: Request) -> Response:
    """Whose an API key is; 404 for a key that is unknown or revoked."""
    found = await request.app.state.api_keys.authenticate(query.api_key)
    if found is None:
        raise Problem(404, "principal_not_found", "no such API key")
    return _json(Principal(owner=found.owner, key_id=found.key_id))


@router.get("/jobs/{job_id}")
async def job(request: Request, job_id: JobId, owner: OwnerQuery) -> Response:
    """One of the owner's jobs as `GET /v1/jobs/{id}` renders it, with its owner and callback URL."""
    jobs = jobs_of(request)
    doc = await jobs.repo.get(job_id, owner)
    if doc is None:
        raise not_found(job_id)
    callback_url = (doc.get("options") or {}).get("callback_url")
    return _json(JobRecord.model_validate({"job": jobs.view(doc), "owner": doc["owner"], "callback_url": callback_url}))


@router.get("/jobs")
async def owner_jobs(
    request: Request,
    owner: OwnerQuery,
    unfinished: bool = False,
    limit: Annotated[int, Query(ge=1, le=MAX_JOBS)] = 100,
) -> Response:
    """The owner's jobs (only the unfinished ones with `unfinished=true`), newest first."""
    jobs = jobs_of(request)
    docs: list[dict[str, Any]] = []
    for status in UNFINISHED if unfinished else (None,):
        page, _ = await jobs.repo.page(owner, status=status, limit=limit, after=None)
        docs.extend(page)
    docs.sort(key=lambda doc: doc["_id"], reverse=True)  # ids sort by creation time
    return _json(JobList.model_validate({"jobs": [jobs.view(doc) for doc in docs[:limit]]}))


@router.get("/batches/{batch_id}")
async def batch(request: Request, batch_id: JobId, owner: OwnerQuery) -> Response:
    """One of the owner's batches: its jobs in submission order."""
    jobs = jobs_of(request)
    found = await jobs.batch(batch_id, owner)
    if found is None:
        raise Problem(404, "batch_not_found", f"no batch {batch_id}")
    _, docs = found
    return _json(BatchRecord.model_validate({"batch_id": batch_id, "jobs": [jobs.view(doc) for doc in docs]}))


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def internal_app(state: State) -> FastAPI:
    """The internal API's application, reading the gateway's state (settings, jobs, API keys)."""
    app = FastAPI(
        title="Stemflow gateway (internal)",
        telemetry=telemetry.fastapi_telemetry(),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state = state
    problems.install(app)
    app.include_router(router)
    return app


class InternalPort(SidePort):
    """Serves the internal API on a port of its own while the app runs (side_port.SidePort). It starts once the
    app's startup has completed, so its routes find the jobs and keys ready, and stops before the app's
    connections close."""

    name = "internal API"
    after_startup = True

    def __init__(self, app: ASGIApp, state: State, host: str, port: int, reuse_port: bool, limits: HttpLimits) -> None:
        super().__init__(app, host, port, reuse_port, limits)
        self.state = state

    def side_app(self) -> ASGIApp:
        if self.state.settings.internal_token is None:
            log.warning("INTERNAL_TOKEN is not set: the internal API refuses every request (the notifier needs it)")
        return internal_app(self.state)
