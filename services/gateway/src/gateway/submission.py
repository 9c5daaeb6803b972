"""What a submission asks for, read once for single jobs and batches.

The body kinds (multipart with `file` parts, JSON with `source_url`/`source_urls`, and for one
job the audio itself as the body, options in the query string), the checks of each file (declared
media type, emptiness, size), the options, the URLs, safe file names and the Idempotency-Key rules
all live here; `POST /v1/jobs` and `POST /v1/batches` differ only in how many songs they take.
Uploads stream into the blob store as they arrive, never whole in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any

import orjson
from fastapi import Request
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from stemflow_shared.events import InputRef, JobOptions, check_http_url
from stemflow_shared.storage import BlobInfo, TooLarge, upload_key

from . import lifecycle
from .jobs import Jobs
from .multipart import FilePart, MultipartUpload, stream_file_part, stream_file_parts
from .problems import Problem
from .settings import Settings

JSON = "application/json"
MULTIPART = "multipart/form-data"
OCTET_STREAM = "application/octet-stream"
# The body kind of a song sent as the request body (`audio/*` or application/octet-stream), in fingerprints.
RAW = "raw"
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
# Room for the form's other fields and boundaries on top of the files' own limit.
FORM_OVERHEAD_BYTES = 64 * 1024


@dataclass
class Submission:
    """One request's songs (each with the id of the job it becomes) and their shared options."""

    kind: str
    options: JobOptions
    inputs: list[tuple[str, InputRef]]

    def fingerprint(self, *, batch: bool) -> str:
        """What an Idempotency-Key stands for (lifecycle.request_fingerprint)."""
        refs = [ref.model_dump(mode="json", exclude_none=True) for _, ref in self.inputs]
        return lifecycle.request_fingerprint(f"batch {self.kind}" if batch else self.kind, self.options, refs)

    async def discard(self, jobs: Jobs) -> None:
        """Remove what was uploaded for a submission that does not become jobs."""
        await jobs.discard_uploads([ref.blob_key for _, ref in self.inputs if ref.blob_key])


async def read_job(request: Request, jobs: Jobs, settings: Settings) -> Submission:
    """`POST /v1/jobs`: one `file` part with option fields, JSON with `source_url` and options, or the audio
    as the body with options in the query string."""
    kind = _body_kind(request, settings, max_files=1)
    if kind == JSON:
        payload = await read_json_object(request, settings.max_json_body_bytes)
        url = source_url(payload.pop("source_url", None), "source_url")
        return Submission(kind, options_from(payload), [(lifecycle.new_job_id(), InputRef(source_url=url))])
    if kind == RAW:
        return await _read_raw(request, jobs, settings)
    job_id = lifecycle.new_job_id()
    upload = MultipartUpload()
    key = upload_key(job_id)
    try:
        info = await jobs.store_upload(
            key,
            stream_file_part(body_chunks(request), request.headers["content-type"], upload),
            settings.max_upload_bytes,
        )
    except TooLarge as exc:
        raise Problem(413, "payload_too_large", f"uploads are limited to {settings.max_upload_bytes} bytes") from exc
    try:
        if not upload.files:
            raise Problem(422, "validation_failed", "the form needs a `file` part", errors=[{"field": "file"}])
        ref = _uploaded(upload.files[0], info, key, settings, label="the file")
        return Submission(kind, _form_options(upload), [(job_id, ref)])
    except BaseException:
        await jobs.discard_uploads([key])
        raise


async def read_batch(request: Request, jobs: Jobs, settings: Settings) -> Submission:
    """`POST /v1/batches`: several `file` parts with option fields, or JSON with `source_urls` and options."""
    limit = settings.batch_max_jobs
    kind = _body_kind(request, settings, max_files=limit)
    if kind == JSON:
        payload = await read_json_object(request, settings.max_json_body_bytes)
        urls = payload.pop("source_urls", None)
        if not isinstance(urls, list) or not 1 <= len(urls) <= limit:
            message = f"source_urls must list 1 to {limit} URLs"
            raise Problem(422, "validation_failed", message, errors=[{"field": "source_urls", "message": message}])
        refs = [InputRef(source_url=source_url(url, "source_urls")) for url in urls]
        return Submission(kind, options_from(payload), [(lifecycle.new_job_id(), ref) for ref in refs])
    upload = MultipartUpload()
    uploaded = await _stream_uploads(request, jobs, settings, upload)
    keys = [upload_key(job_id) for job_id, _ in uploaded]
    try:
        if not upload.files:
            raise Problem(
                422, "validation_failed", "the form needs at least one `file` part", errors=[{"field": "file"}]
            )
        if len(uploaded) != len(upload.files):
            raise Problem(422, "validation_failed", "every file must have content", errors=[{"field": "file"}])
        inputs = [
            (job_id, _uploaded(part, info, upload_key(job_id), settings, label=f"file {number}"))
            for number, (part, (job_id, info)) in enumerate(zip(upload.files, uploaded, strict=True), start=1)
        ]
        return Submission(kind, _form_options(upload), inputs)
    except BaseException:
        await jobs.discard_uploads(keys)
        raise


def _body_kind(request: Request, settings: Settings, *, max_files: int) -> str:
    """JSON, multipart or (for one song) RAW, else 415; a body declared larger than its files may be is 413 at once."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()  # none is no body kind
    raw = max_files == 1 and (kind == OCTET_STREAM or kind.startswith("audio/"))
    if kind == MULTIPART or raw:
        declared = request.headers.get("content-length", "")
        limit = settings.max_upload_bytes * max_files
        if declared.isdigit() and int(declared) > limit + (0 if raw else FORM_OVERHEAD_BYTES):
            what = "uploads are" if max_files == 1 else "a batch is"
            raise Problem(413, "payload_too_large", f"{what} limited to {limit} bytes")
        return RAW if raw else kind
    if kind == JSON:
        return kind
    if max_files == 1:
        wanted = "the audio as the body (audio/* or application/octet-stream), multipart/form-data with a file"
        raise Problem(415, "unsupported_media_type", f"send {wanted}, or JSON with source_url")
    raise Problem(415, "unsupported_media_type", "send multipart/form-data with files, or JSON with source_urls")


def _media_type(content_type: str | None) -> str:
    return (content_type or OCTET_STREAM).split(";")[0].strip().lower()


async def _read_raw(request: Request, jobs: Jobs, settings: Settings) -> Submission:
    """The song as the body: options from the query string (checked before a byte is stored), the file name
    from `Content-Disposition`; streamed into the blob store, hashed on the way."""
    declared = _media_type(request.headers.get("content-type"))
    if declared not in settings.media_types:
        raise Problem(415, "unsupported_media_type", f"the body: files of type {declared} are not accepted")
    options = options_from({k: v for k, v in request.query_params.items() if v != ""})
    part = FilePart(disposition_filename(request.headers.get("content-disposition")), declared)
    job_id = lifecycle.new_job_id()
    key = upload_key(job_id)
    try:
        info = await jobs.store_upload(key, body_chunks(request), settings.max_upload_bytes)
    except TooLarge as exc:
        raise Problem(413, "payload_too_large", f"uploads are limited to {settings.max_upload_bytes} bytes") from exc
    try:
        return Submission(RAW, options, [(job_id, _uploaded(part, info, key, settings, label="the body"))])
    except BaseException:
        await jobs.discard_uploads([key])
        raise


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The request body as the server hands it over, straight from ASGI `receive` (Starlette's
    `request.stream()` without its extra generator hop per chunk); ClientDisconnect if the client leaves."""
    receive = request.receive
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        more = message.get("more_body", False)
        if body := message.get("body"):
            yield body


def disposition_filename(header: str | None) -> str | None:
    """The file name a `Content-Disposition` header gives, `filename*=` (RFC 6266's UTF-8 form) first."""
    if not header:
        return None
    message = Message()
    message["content-disposition"] = header
    names = [value for key, value in (message.get_params(header="content-disposition") or [])[1:] if key == "filename"]
    chosen = next((name for name in names if isinstance(name, tuple)), names[0] if names else None)
    return collapse_rfc2231_value(chosen) if chosen is not None else None


def _uploaded(part: FilePart, info: BlobInfo, key: str, settings: Settings, *, label: str) -> InputRef:
    """The input of one uploaded file, once its declared type and its size are acceptable."""
    declared = _media_type(part.content_type)
    if declared not in settings.media_types:
        raise Problem(415, "unsupported_media_type", f"{label}: files of type {declared} are not accepted")
    if info.size == 0:
        raise Problem(422, "validation_failed", f"{label} is empty", errors=[{"field": "file", "message": "empty"}])
    return InputRef(
        blob_key=key,
        filename=safe_filename(part.filename),
        content_type=declared,
        size=info.size,
        sha256=info.sha256,
    )


async def _stream_uploads(
    request: Request, jobs: Jobs, settings: Settings, upload: MultipartUpload
) -> list[tuple[str, BlobInfo]]:
    """Stream each file part into its own job's upload blob, one after the other, in constant memory."""
    writer = _PartWriter(jobs, settings.max_upload_bytes)
    try:
        async for index, chunk in stream_file_parts(
            body_chunks(request), request.headers["content-type"], upload, max_files=settings.batch_max_jobs
        ):
            await writer.write(index, chunk)
        await writer.finish_part()
    except TooLarge as exc:
        await writer.abandon()
        raise Problem(413, "payload_too_large", f"each file is limited to {settings.max_upload_bytes} bytes") from exc
    except BaseException:
        await writer.abandon()
        raise
    return writer.uploaded


class _PartWriter:
    """Feeds the parts' chunks to one blob writer per part, each in a job of its own."""

    def __init__(self, jobs: Jobs, max_bytes: int) -> None:
        self._jobs = jobs
        self._max_bytes = max_bytes
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
        self._task: asyncio.Task[BlobInfo] | None = None
        self._job_ids: list[str] = []
        self.uploaded: list[tuple[str, BlobInfo]] = []

    async def write(self, index: int, chunk: bytes) -> None:
        while len(self._job_ids) <= index:
            await self.finish_part()
            self._start_part()
        await self._put(chunk)

    def _start_part(self) -> None:
        self._job_ids.append(lifecycle.new_job_id())
        self._queue = asyncio.Queue(maxsize=4)
        self._task = asyncio.create_task(
            self._jobs.store_upload(upload_key(self._job_ids[-1]), _drain(self._queue), self._max_bytes)
        )

    async def finish_part(self) -> None:
        if self._task is not None:
            await self._put(None)
            self.uploaded.append((self._job_ids[-1], await self._task))
            self._task = None

    async def _put(self, item: bytes | None) -> None:
        """Hand a chunk to the blob writer; if the writer already failed (too large), raise its error now."""
        put = asyncio.ensure_future(self._queue.put(item))
        if self._task is None:
            await put
            return
        done, _ = await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if put not in done:
            put.cancel()
            self._task.result()  # raises the writer's error
            raise RuntimeError("the upload writer stopped early")

    async def abandon(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self._jobs.discard_uploads([upload_key(job_id) for job_id in self._job_ids])


async def _drain(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (chunk := await queue.get()) is not None:
        yield chunk


def _form_options(upload: MultipartUpload) -> JobOptions:
    return options_from({k: v for k, v in upload.fields.items() if v != ""})


def options_from(fields: dict[str, Any]) -> JobOptions:
    """Validated options, or 422 naming each field and what to fix."""
    try:
        return JobOptions.model_validate(fields)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in err["loc"]) or "options", "message": err["msg"]} for err in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message'].removeprefix('Value error, ')}" for e in errors)
        raise Problem(422, "validation_failed", detail, errors=errors) from exc


def source_url(url: Any, field: str) -> str:
    """A source URL parsed strictly (events.check_http_url), or 422 naming the field."""
    if not isinstance(url, str) or len(url) > 2048:
        message = f"{field} must hold URL strings of at most 2048 characters"
        raise Problem(422, "validation_failed", message, errors=[{"field": field, "message": message}])
    try:
        return check_http_url(url, "source_url")
    except ValueError as exc:
        raise Problem(422, "validation_failed", str(exc), errors=[{"field": field, "message": str(exc)}]) from None


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read up to `limit` bytes (413 past it, 400/422 when not an object)."""
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


def safe_filename(name: str | None) -> str | None:
    """Keep the base name for display only; it never reaches a path."""
    if not name:
        return None
    base = re.split(r"[\\/]", name)[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable())[:255]
    return cleaned or None


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


def request_body(*, files: dict[str, Any], urls: tuple[str, dict[str, Any]], raw: bool = False) -> dict[str, Any]:
    """The OpenAPI request body of a submission route (the routes parse their bodies themselves, streaming)."""
    options = option_properties()
    url_field, url_schema = urls
    content: dict[str, Any] = {
        MULTIPART: {"schema": {"type": "object", "required": ["file"], "properties": {"file": files, **options}}},
        JSON: {"schema": {"type": "object", "required": [url_field], "properties": {url_field: url_schema, **options}}},
    }
    if raw:
        song = {"schema": {"type": "string", "format": "binary"}}
        content.update({"audio/*": song, OCTET_STREAM: song})
    return {"required": True, "content": content}


def raw_body_parameters() -> list[dict[str, Any]]:
    """The OpenAPI query parameters of a raw-body upload: the job options, and the file name's header."""
    described = "With the audio as the body (audio/* or application/octet-stream) only: "
    parameters = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": described + schema.get("description", f"the job option {name}"),
            "schema": {"type": "string"} if name == "targets" else schema,
        }
        for name, schema in option_properties().items()
    ]
    disposition = 'e.g. `attachment; filename="song.flac"`: the name kept for display'
    parameters.append(
        {
            "name": "Content-Disposition",
            "in": "header",
            "required": False,
            "description": described + disposition,
            "schema": {"type": "string"},
        }
    )
    return parameters
