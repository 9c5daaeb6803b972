"""Batches: several songs with shared options in one request; one id whose status aggregates its jobs.

`POST /v1/batches` takes multipart with several `file` parts (each streamed to its own blob, never
buffered) plus option fields, or JSON `{"source_urls": [...], ...options}` (submission.py reads both).
Every song becomes an ordinary job carrying `batch_id`; `GET /v1/batches/{id}` reads the jobs back on
their index and aggregates them; the notifier lets a WebSocket subscribe to a batch.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Request, Response

from stemflow_shared.events import TERMINAL_JOB_STATUSES

from . import lifecycle, submission, views
from .deps import JobsDep, Owner, SettingsDep
from .jobs import Jobs, in_submission_order
from .problems import Problem

router = APIRouter(prefix="/v1")


@router.post(
    "/batches",
    status_code=202,
    responses={202: {"description": "Accepted"}},
    openapi_extra={
        "requestBody": submission.request_body(
            files={
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "minItems": 1,
                "description": "at most BATCH_MAX_JOBS files (default 50)",
            },
            urls=(
                "source_urls",
                {
                    "type": "array",
                    "items": {"type": "string", "format": "uri", "maxLength": 2048},
                    "minItems": 1,
                    "description": "at most BATCH_MAX_JOBS URLs (default 50)",
                },
            ),
        )
    },
)
async def create_batch(
    request: Request,
    who: Owner,
    jobs: JobsDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Response:
    """Submit several songs with shared options: multipart `file` parts, or JSON with `source_urls`."""
    submission.check_idempotency_key(idempotency_key)
    asked = await submission.read_batch(request, jobs, settings)
    batch_id = lifecycle.new_job_id()
    fingerprint = asked.fingerprint(batch=True) if idempotency_key else None
    try:
        batch, docs = await jobs.submit_batch_once(
            batch_id,
            who.owner,
            asked.options,
            asked.inputs,
            idempotency_key=idempotency_key,
            request_fingerprint=fingerprint,
        )
    except BaseException:
        await asked.discard(jobs)
        raise
    if batch["_id"] != batch_id:  # the key was used before: the same request gets its batch, another is refused
        await asked.discard(jobs)
        submission.same_request(batch, fingerprint)
    body = orjson.dumps(batch_view(jobs, batch, docs))
    return Response(
        body, status_code=202, media_type="application/json", headers={"Location": batch_url(jobs, batch["_id"])}
    )


@router.get("/batches/{batch_id}")
async def get_batch(batch_id: str, who: Owner, jobs: JobsDep) -> Response:
    """The batch: its aggregate status and progress, and each of its jobs."""
    found = await jobs.batch(batch_id, who.owner)
    if found is None:
        raise Problem(404, "batch_not_found", f"no batch {batch_id}")
    body = orjson.dumps(batch_view(jobs, *found))
    return Response(body, media_type="application/json", headers={"Cache-Control": "private, no-cache"})


def batch_url(jobs: Jobs, batch_id: str) -> str:
    return f"{jobs.base_url}/v1/batches/{batch_id}"


def aggregate_status(statuses: list[str]) -> str:
    """`queued` until one starts, `processing` while any runs, then the shared outcome or `partial`."""
    if not statuses or all(s == "queued" for s in statuses):
        return "queued"
    if any(s not in TERMINAL_JOB_STATUSES for s in statuses):
        return "processing"
    outcomes = set(statuses)
    return outcomes.pop() if len(outcomes) == 1 else "partial"


def batch_view(jobs: Jobs, batch: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, Any]:
    docs = in_submission_order(batch, docs)
    statuses = [doc["status"] for doc in docs]
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    progress = round(sum(doc["progress"] for doc in docs) / len(docs), 1) if docs else 0.0
    return {
        "id": batch["_id"],
        "status": aggregate_status(statuses),
        "progress": progress,
        "counts": counts,
        "options": batch["options"],
        "jobs": [jobs.view(doc) for doc in docs],
        "created_at": views._iso(batch["created_at"]),
        "links": {"self": batch_url(jobs, batch["_id"]), "events": f"{jobs.events_url}?batch_id={batch['_id']}"},
    }
