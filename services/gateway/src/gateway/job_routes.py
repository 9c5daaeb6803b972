"""The v1 job routes: submit, read, list, cancel, delete (results: downloads.py, batches: batches.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response

from stemflow_shared.events import JobStatus

from . import submission, views
from .cached_reads import LOOKED_UP, PAGE_MISS, job_answer, page_headers
from .deps import Caller, JobsDep, LimiterDep, Owner, SettingsDep, not_found
from .jobs import Jobs
from .problems import Problem
from .repository import decode_cursor

router = APIRouter(prefix="/v1")


@router.post(
    "/jobs",
    status_code=202,
    responses={202: {"description": "Accepted"}},
    openapi_extra={
        "requestBody": submission.request_body(
            files={"type": "string", "format": "binary"},
            urls=("source_url", {"type": "string", "format": "uri", "maxLength": 2048}),
            raw=True,
        ),
        "parameters": submission.raw_body_parameters(),
    },
)
async def create_job(
    request: Request,
    who: Owner,
    jobs: JobsDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Response:
    """Submit a job: multipart (`file` + option fields), JSON with `source_url`, or the audio as the body
    (`audio/*` or `application/octet-stream`) with the options in the query string."""
    submission.check_idempotency_key(idempotency_key)
    asked = await submission.read_job(request, jobs, settings)
    (job_id, input_ref) = asked.inputs[0]
    fingerprint = asked.fingerprint(batch=False) if idempotency_key else None
    try:
        doc = await jobs.submit_once(
            job_id,
            who.owner,
            asked.options,
            input_ref,
            idempotency_key=idempotency_key,
            request_fingerprint=fingerprint,
        )
    except BaseException:
        await asked.discard(jobs)
        raise
    if doc["_id"] != job_id:  # the key was used before: the same request gets its job, another is refused
        await asked.discard(jobs)
        submission.same_request(doc, fingerprint)
    return _job_response(jobs, doc, 202, Location=jobs.job_url(doc["_id"]))


def _job_response(jobs: Jobs, doc: dict[str, Any], status_code: int = 200, **headers: str) -> Response:
    return Response(
        jobs.render(doc),
        status_code=status_code,
        media_type="application/json",
        headers={"ETag": views.etag(doc["_id"], doc["version"]), "Cache-Control": "private, no-cache", **headers},
    )


@router.get("/jobs/{job_id}")
async def get_job(
    request: Request,
    job_id: str,
    who: Caller,
    jobs: JobsDep,
    limiter: LimiterDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    """The job, from the cache when possible; `If-None-Match` answers 304 (cache hits: cached_reads.py)."""
    gzip_ok = "gzip" in request.headers.get("accept-encoding", "")
    found = None
    if not request.scope.get(LOOKED_UP):  # else the cached read has counted it and found no hit for this owner
        found, count = await jobs.read_cached(job_id, gzip_ok=gzip_ok, counter_key=limiter.counter_key(who))
        limiter.enforce(count)
    if found is None:
        found = await jobs.read(job_id, who.owner, gzip_ok=gzip_ok)
    if found is None or found.owner != who.owner:
        raise not_found(job_id)
    status, headers, body = job_answer(job_id, found, if_none_match)
    return Response(body, status_code=status, headers=dict(headers))


@router.get("/jobs")
async def list_jobs(
    request: Request,
    who: Caller,
    jobs: JobsDep,
    limiter: LimiterDep,
    settings: SettingsDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    cursor: str | None = None,
) -> Response:
    """Newest first, keyset pagination; counted in the same Redis call as the cached page (cached_reads.py
    answers the hits), and a page read from MongoDB is cached until one of the owner's jobs changes."""
    try:
        after = decode_cursor(cursor) if cursor else None
    except ValueError as exc:
        raise Problem(422, "validation_failed", "invalid cursor", errors=[{"field": "cursor"}]) from exc
    limit = min(limit, settings.list_max_limit)
    gzip_ok = "gzip" in request.headers.get("accept-encoding", "")
    page = request.scope.get(PAGE_MISS)  # cached_reads.py counted it and found no page cached
    if page is None:
        page, count = await jobs.cached_page(
            who.owner, status=status, limit=limit, after=after, gzip_ok=gzip_ok, counter_key=limiter.counter_key(who)
        )
        limiter.enforce(count)
    if page.body is not None:
        return _page_response(page.body, page.gzipped)
    body, gzipped = await jobs.list_page(
        who.owner, status=status, limit=limit, after=after, gzip_ok=gzip_ok, generation=page.generation
    )
    return _page_response(body, gzipped)


def _page_response(body: bytes, gzipped: bool) -> Response:
    """A page, with the headers cached_reads.py answers a cached one with; one already gzipped says so (the GZip
    middleware then leaves it alone)."""
    return Response(body, headers={name.decode(): value.decode() for name, value in page_headers(body, gzipped)})


@router.post("/jobs/{job_id}/cancel", status_code=200)
async def cancel_job(job_id: str, who: Owner, jobs: JobsDep) -> Response:
    doc = await jobs.cancel(job_id, who.owner)
    if doc is None:
        raise not_found(job_id)
    if doc["status"] != "cancelled":
        raise Problem(409, "job_finished", f"job {job_id} already ended as {doc['status']}", job_status=doc["status"])
    return _job_response(jobs, doc)


@router.delete("/jobs/{job_id}", status_code=204)
async def delete_job(job_id: str, who: Owner, jobs: JobsDep) -> Response:
    if not await jobs.delete(job_id, who.owner):
        raise not_found(job_id)
    return Response(status_code=204)
