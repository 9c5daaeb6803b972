"""The v1 job routes of the contract: submit, read, list, cancel, delete (results are in downloads.py)."""

from __future__ import annotations

import re
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import ValidationError

from stemflow_shared import metrics
from stemflow_shared.events import InputRef, JobOptions, JobStatus, check_http_url
from stemflow_shared.storage import TooLarge, upload_key

from . import state, views
from .deps import Caller, Owner, jobs_of, limiter_of, not_found
from .hotpath import LOOKED_UP
from .jobs import Jobs
from .problems import Problem
from .ratelimit import COUNTER_TTL_S
from .repository import IdempotencyConflict, decode_cursor
from .uploads import MultipartUpload, stream_file_part

router = APIRouter(prefix="/v1")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


def _job_response(body: bytes, doc_id: str, version: int, status_code: int = 200, **headers: str) -> Response:
    return Response(
        body,
        status_code=status_code,
        media_type="application/json",
        headers={"ETag": views.etag(doc_id, version), "Cache-Control": "private, no-cache", **headers},
    )


def _options_from(fields: dict[str, Any]) -> JobOptions:
    try:
        return JobOptions.model_validate(fields)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in err["loc"]) or "options", "message": err["msg"]} for err in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message'].removeprefix('Value error, ')}" for e in errors)
        raise Problem(422, "validation_failed", detail, errors=errors) from exc


def _check_source_url(url: Any) -> str:
    if not isinstance(url, str) or len(url) > 2048:
        message = "source_url must be a URL string of at most 2048 characters"
        raise Problem(422, "validation_failed", message, errors=[{"field": "source_url", "message": message}])
    try:
        return check_http_url(url, "source_url")
    except ValueError as exc:
        raise Problem(
            422, "validation_failed", str(exc), errors=[{"field": "source_url", "message": str(exc)}]
        ) from None


def option_properties() -> dict[str, Any]:
    """The options' JSON Schema properties with their `$defs` inlined (an OpenAPI body has no `$defs` of its own)."""
    schema = JobOptions.model_json_schema()
    defs = schema.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema["properties"])


def _submission_body() -> dict[str, Any]:
    """The request body of `POST /v1/jobs` for the OpenAPI document (the route parses it itself, streaming)."""
    options = option_properties()
    upload = {"file": {"type": "string", "format": "binary"}, **options}
    by_url = {"source_url": {"type": "string", "format": "uri", "maxLength": 2048}, **options}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": upload}},
            "application/json": {"schema": {"type": "object", "required": ["source_url"], "properties": by_url}},
        },
    }


@router.post(
    "/jobs",
    status_code=202,
    responses={202: {"description": "Accepted"}},
    openapi_extra={"requestBody": _submission_body()},
)
async def create_job(
    request: Request,
    who: Owner,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Response:
    """Submit a job: multipart (`file` + option fields) or JSON with `source_url`."""
    jobs = jobs_of(request)
    settings = request.app.state.settings
    content_type = request.headers.get("content-type", "")
    content_length = _declared_length(request)
    check_idempotency_key(idempotency_key)
    job_id = state.new_job_id()
    media = content_type.split(";")[0].strip().lower()
    if media == "application/json":
        options, input_ref = await _json_submission(request)
    elif media == "multipart/form-data":
        if content_length is not None and content_length > settings.max_upload_bytes + 64 * 1024:
            raise Problem(413, "payload_too_large", f"uploads are limited to {settings.max_upload_bytes} bytes")
        options, input_ref = await _multipart_submission(request, job_id, content_type)
    else:
        raise Problem(415, "unsupported_media_type", "send multipart/form-data with a file, or JSON with source_url")
    input_doc = input_ref.model_dump(mode="json", exclude_none=True)
    fingerprint = state.request_fingerprint(media, options, [input_doc]) if idempotency_key else None
    try:
        existing = await jobs.repo.find_by_idempotency_key(who.owner, idempotency_key) if idempotency_key else None
        if existing is None:
            try:
                doc = await jobs.submit(
                    job_id,
                    who.owner,
                    options,
                    input_ref,
                    idempotency_key=idempotency_key,
                    request_fingerprint=fingerprint,
                )
                return await _accepted(jobs, doc)
            except IdempotencyConflict as conflict:
                existing = conflict.job
    except BaseException:
        if input_ref.blob_key:
            await jobs.blobs.delete_prefix(input_ref.blob_key)
        raise
    # The key was used before: the same request gets the same job, another request is refused.
    if input_ref.blob_key:
        await jobs.blobs.delete_prefix(input_ref.blob_key)
    same_request(existing, fingerprint)
    metrics.DEDUP_HITS.labels("idempotency_key").inc()
    return await _accepted(jobs, existing)


def check_idempotency_key(key: str | None) -> None:
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise Problem(400, "invalid_idempotency_key", "Idempotency-Key must be 1-200 visible ASCII characters")


def same_request(earlier: dict[str, Any], fingerprint: str | None) -> None:
    """Refuse (422 `idempotency_key_reused`) a key sent again with another request, as the IETF draft says."""
    recorded = earlier.get("request_fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise Problem(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request (other options, file, URLs or body type); "
            "send a new key for a new request",
        )


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


async def _accepted(jobs: Jobs, doc: dict[str, Any]) -> Response:
    return _job_response(jobs.render(doc), doc["_id"], doc["version"], 202, Location=jobs.job_url(doc["_id"]))


async def _json_submission(request: Request) -> tuple[JobOptions, InputRef]:
    payload = await read_json_object(request)
    url = _check_source_url(payload.pop("source_url", None))
    return _options_from(payload), InputRef(source_url=url)


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request's JSON object, read up to MAX_JSON_BODY_BYTES (413 past it, 400/422 when not an object)."""
    limit = request.app.state.settings.max_json_body_bytes
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise Problem(413, "payload_too_large", f"JSON submissions are limited to {limit} bytes")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "malformed_json", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise Problem(422, "validation_failed", "the body must be a JSON object", errors=[{"field": "body"}])
    return payload


async def _multipart_submission(request: Request, job_id: str, content_type: str) -> tuple[JobOptions, InputRef]:
    jobs = jobs_of(request)
    settings = request.app.state.settings
    upload = MultipartUpload()
    key = upload_key(job_id)
    try:
        info = await jobs.blobs.put_stream(
            key, stream_file_part(request.stream(), content_type, upload), max_bytes=settings.max_upload_bytes
        )
    except TooLarge as exc:
        raise Problem(413, "payload_too_large", f"uploads are limited to {settings.max_upload_bytes} bytes") from exc
    try:
        if not upload.saw_file:
            raise Problem(422, "validation_failed", "the form needs a `file` part", errors=[{"field": "file"}])
        declared = (upload.content_type or "application/octet-stream").split(";")[0].strip().lower()
        if declared not in settings.media_types:
            raise Problem(415, "unsupported_media_type", f"files of type {declared} are not accepted")
        if info.size == 0:
            raise Problem(422, "validation_failed", "the file is empty", errors=[{"field": "file"}])
        options = _options_from({k: v for k, v in upload.fields.items() if v != ""})
    except BaseException:
        await jobs.blobs.delete_prefix(key)
        raise
    filename = _safe_filename(upload.filename)
    return options, InputRef(blob_key=key, filename=filename, content_type=declared, size=info.size, sha256=info.sha256)


def _safe_filename(name: str | None) -> str | None:
    """Keep the base name for display only; it never reaches a path."""
    if not name:
        return None
    base = re.split(r"[\\/]", name)[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable())[:255]
    return cleaned or None


@router.get("/jobs/{job_id}")
async def get_job(
    request: Request,
    job_id: str,
    who: Caller,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    """The job, from the cache when possible; `If-None-Match` answers 304."""
    jobs, limiter = jobs_of(request), limiter_of(request)
    gzip_ok = "gzip" in request.headers.get("accept-encoding", "")
    cached = None
    if not request.scope.get(LOOKED_UP):  # else the hot path has counted it and found no hit for this owner
        cached, count = await jobs.cache.get(
            job_id, gzip_ok=gzip_ok, counter_key=limiter.counter_key(who), counter_ttl_s=COUNTER_TTL_S
        )
        limiter.enforce(count)
    if cached is None:
        version, body, gzipped = await _from_database(jobs, job_id, who.owner, gzip_ok)
    elif cached.owner != who.owner:
        raise not_found(job_id)
    else:
        version, body, gzipped = cached.version, cached.body, cached.gzipped
    encoding = {"Content-Encoding": "gzip"} if gzipped else {}
    tag = views.etag(job_id, version)
    if if_none_match is not None and tag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers={"ETag": tag})
    return _job_response(body, job_id, version, Vary="Accept-Encoding", **encoding)


async def _from_database(jobs: Jobs, job_id: str, owner: str, gzip_ok: bool) -> tuple[int, bytes, bool]:
    """(version, body, gzipped) of a job read from MongoDB, cached on the way."""
    doc = await jobs.repo.get(job_id, owner)
    if doc is None:
        raise not_found(job_id)
    body, compressed = await jobs.remember(doc)
    if gzip_ok and compressed:
        return doc["version"], compressed, True
    return doc["version"], body, False


@router.get("/jobs")
async def list_jobs(
    request: Request,
    who: Owner,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    cursor: str | None = None,
) -> Response:
    """Newest first, keyset pagination."""
    jobs = jobs_of(request)
    limit = min(limit, request.app.state.settings.list_max_limit)
    try:
        after = decode_cursor(cursor) if cursor else None
    except ValueError as exc:
        raise Problem(422, "validation_failed", "invalid cursor", errors=[{"field": "cursor"}]) from exc
    page = await jobs.list_page(who.owner, status=status, limit=limit, after=after)
    return Response(page, media_type="application/json")


@router.get("/models")
async def list_models(request: Request, who: Owner) -> dict[str, Any]:
    """Every model with its stem sets, whether a separator serves it now, its queue depth and estimated wait."""
    return await jobs_of(request).models.listing()


@router.post("/jobs/{job_id}/cancel", status_code=200)
async def cancel_job(request: Request, job_id: str, who: Owner) -> Response:
    jobs = jobs_of(request)
    doc = await jobs.cancel(job_id, who.owner)
    if doc is None:
        raise not_found(job_id)
    if doc["status"] != "cancelled":
        raise Problem(409, "job_finished", f"job {job_id} already ended as {doc['status']}", job_status=doc["status"])
    return _job_response(jobs.render(doc), job_id, doc["version"])


@router.delete("/jobs/{job_id}", status_code=204)
async def delete_job(request: Request, job_id: str, who: Owner) -> Response:
    if not await jobs_of(request).delete(job_id, who.owner):
        raise not_found(job_id)
    return Response(status_code=204)
