"""Batches: several songs with shared options in one request; one id whose status aggregates its jobs.

`POST /v1/batches` takes multipart with several `file` parts (each streamed to its own blob, never
buffered) plus option fields, or JSON `{"source_urls": [...], ...options}`. Every song becomes an
ordinary job carrying `batch_id`; `GET /v1/batches/{id}` reads the jobs back on their index and
aggregates them; the notifier lets a WebSocket subscribe to a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Request, Response

from stemflow_shared import metrics
from stemflow_shared.events import TERMINAL_JOB_STATUSES, InputRef, JobOptions
from stemflow_shared.storage import TooLarge, upload_key

from . import state, views
from .deps import Owner, jobs_of
from .jobs import Jobs
from .problems import Problem
from .repository import IdempotencyConflict
from .routes import (
    _check_source_url,
    _declared_length,
    _options_from,
    _safe_filename,
    check_idempotency_key,
    option_properties,
    read_json_object,
    same_request,
)
from .uploads import MultipartUpload, stream_file_parts

router = APIRouter(prefix="/v1")


def _batch_body(limit: int) -> dict[str, Any]:
    options = option_properties()
    files = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1, "maxItems": limit}
    urls = {"type": "array", "items": {"type": "string", "format": "uri", "maxLength": 2048}, "minItems": 1}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"], "properties": {"file": files, **options}}
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["source_urls"],
                    "properties": {"source_urls": urls, **options},
                }
            },
        },
    }


@router.post(
    "/batches",
    status_code=202,
    responses={202: {"description": "Accepted"}},
    openapi_extra={"requestBody": _batch_body(50)},
)
async def create_batch(
    request: Request,
    who: Owner,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Response:
    """Submit several songs with shared options: multipart `file` parts, or JSON with `source_urls`."""
    jobs = jobs_of(request)
    settings = request.app.state.settings
    check_idempotency_key(idempotency_key)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    batch_id = state.new_job_id()
    if media == "application/json":
        options, refs = await _json_batch(request, settings.batch_max_jobs)
        job_ids = [state.new_job_id() for _ in refs]
    elif media == "multipart/form-data":
        declared = _declared_length(request)
        total_limit = settings.max_upload_bytes * settings.batch_max_jobs
        if declared is not None and declared > total_limit + 64 * 1024:
            raise Problem(413, "payload_too_large", f"a batch is limited to {total_limit} bytes")
        job_ids, options, refs = await _multipart_batch(request, jobs, settings)
    else:
        raise Problem(415, "unsupported_media_type", "send multipart/form-data with files, or JSON with source_urls")
    inputs = [ref.model_dump(mode="json", exclude_none=True) for ref in refs]
    fingerprint = state.request_fingerprint(f"batch {media}", options, inputs) if idempotency_key else None
    try:
        earlier = await jobs.repo.find_batch_by_idempotency_key(who.owner, idempotency_key) if idempotency_key else None
        if earlier is None:
            try:
                batch, docs = await jobs.submit_batch(
                    batch_id,
                    who.owner,
                    options,
                    list(zip(job_ids, refs, strict=True)),
                    idempotency_key=idempotency_key,
                    request_fingerprint=fingerprint,
                )
            except IdempotencyConflict as conflict:
                earlier = conflict.job
    except BaseException:
        await _remove_uploads(jobs, refs)
        raise
    if earlier is not None:
        # The key was used before: the same request gets the same batch, another request is refused.
        await _remove_uploads(jobs, refs)
        same_request(earlier, fingerprint)
        metrics.DEDUP_HITS.labels("idempotency_key").inc()
        batch, docs = earlier, await jobs.repo.batch_jobs(earlier["_id"])
    body = orjson.dumps(batch_view(jobs, batch, docs))
    return Response(
        body, status_code=202, media_type="application/json", headers={"Location": batch_url(jobs, batch_id)}
    )


@router.get("/batches/{batch_id}")
async def get_batch(request: Request, batch_id: str, who: Owner) -> Response:
    """The batch: its aggregate status and progress, and each of its jobs."""
    jobs = jobs_of(request)
    batch = await jobs.repo.get_batch(batch_id, who.owner)
    if batch is None:
        raise Problem(404, "batch_not_found", f"no batch {batch_id}")
    docs = await jobs.repo.batch_jobs(batch_id)
    body = orjson.dumps(batch_view(jobs, batch, docs))
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
    # Submission order is the batch's own list (ids made in one millisecond do not sort by creation).
    order = {job_id: i for i, job_id in enumerate(batch.get("job_ids") or ())}
    docs = sorted(docs, key=lambda doc: order.get(doc["_id"], len(order)))
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


async def _json_batch(request: Request, limit: int) -> tuple[JobOptions, list[InputRef]]:
    payload = await read_json_object(request)
    urls = payload.pop("source_urls", None)
    if not isinstance(urls, list) or not 1 <= len(urls) <= limit:
        raise Problem(
            422, "validation_failed", f"source_urls must list 1 to {limit} URLs", errors=[{"field": "source_urls"}]
        )
    refs = [InputRef(source_url=_check_source_url(url)) for url in urls]
    return _options_from(payload), refs


async def _multipart_batch(request: Request, jobs: Jobs, settings: Any) -> tuple[list[str], JobOptions, list[InputRef]]:
    """Stream each file part into its own job's upload blob, one after the other, in constant memory."""
    upload = MultipartUpload()
    job_ids: list[str] = []
    refs: list[InputRef] = []
    infos: list[Any] = []
    writer: asyncio.Task[Any] | None = None
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)

    async def drain(q: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
        while (chunk := await q.get()) is not None:
            yield chunk

    async def finish_part() -> None:
        nonlocal writer
        if writer is not None:
            await _put(queue, None, writer)
            infos.append(await writer)
            writer = None

    try:
        current = -1
        async for index, chunk in stream_file_parts(
            request.stream(), request.headers["content-type"], upload, max_files=settings.batch_max_jobs
        ):
            while current < index:
                await finish_part()
                current += 1
                job_ids.append(state.new_job_id())
                queue = asyncio.Queue(maxsize=4)
                key = upload_key(job_ids[-1])
                writer = asyncio.create_task(
                    jobs.blobs.put_stream(key, drain(queue), max_bytes=settings.max_upload_bytes)
                )
            await _put(queue, chunk, writer)
        await finish_part()
    except TooLarge as exc:
        await _cancel(writer)
        await _remove_keys(jobs, job_ids)
        raise Problem(413, "payload_too_large", f"each file is limited to {settings.max_upload_bytes} bytes") from exc
    except BaseException:
        await _cancel(writer)
        await _remove_keys(jobs, job_ids)
        raise
    try:
        if not upload.files:
            raise Problem(
                422, "validation_failed", "the form needs at least one `file` part", errors=[{"field": "file"}]
            )
        if len(infos) != len(upload.files):
            raise Problem(422, "validation_failed", "every file must have content", errors=[{"field": "file"}])
        for number, (part, info) in enumerate(zip(upload.files, infos, strict=True)):
            declared = (part.content_type or "application/octet-stream").split(";")[0].strip().lower()
            if info.size == 0:
                raise Problem(422, "validation_failed", f"file {number + 1} is empty", errors=[{"field": "file"}])
            if declared not in settings.media_types:
                raise Problem(415, "unsupported_media_type", f"file {number + 1}: type {declared} is not accepted")
            refs.append(
                InputRef(
                    blob_key=upload_key(job_ids[number]),
                    filename=_safe_filename(part.filename),
                    content_type=declared,
                    size=info.size,
                    sha256=info.sha256,
                )
            )
        options = _options_from({k: v for k, v in upload.fields.items() if v != ""})
    except BaseException:
        await _remove_keys(jobs, job_ids)
        raise
    return job_ids, options, refs


async def _put(queue: asyncio.Queue[bytes | None], item: bytes | None, writer: asyncio.Task[Any] | None) -> None:
    """Hand a chunk to the blob writer; if the writer already failed (too large), raise its error now."""
    put = asyncio.ensure_future(queue.put(item))
    if writer is None:
        await put
        return
    done, _ = await asyncio.wait({put, writer}, return_when=asyncio.FIRST_COMPLETED)
    if put not in done:
        put.cancel()
        writer.result()  # raises the writer's error
        raise RuntimeError("the upload writer stopped early")


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def _remove_keys(jobs: Jobs, job_ids: list[str]) -> None:
    for job_id in job_ids:
        await jobs.blobs.delete_prefix(upload_key(job_id))


async def _remove_uploads(jobs: Jobs, refs: list[InputRef]) -> None:
    for ref in refs:
        if ref.blob_key:
            await jobs.blobs.delete_prefix(ref.blob_key)
