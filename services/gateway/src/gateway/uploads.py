"""Streaming multipart parsing: the file part goes to the blob store chunk by chunk, never whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

from .problems import Problem

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    filename: str | None = None
    content_type: str | None = None
    value: bytearray = field(default_factory=bytearray)


@dataclass
class FilePart:
    filename: str | None
    content_type: str | None


@dataclass
class MultipartUpload:
    """What the form held besides the file bytes: its fields, and each file's name and declared type."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[FilePart] = field(default_factory=list)

    @property
    def saw_file(self) -> bool:
        return bool(self.files)

    @property
    def filename(self) -> str | None:
        return self.files[0].filename if self.files else None

    @property
    def content_type(self) -> str | None:
        return self.files[0].content_type if self.files else None


def boundary_of(content_type: str) -> bytes:
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise Problem(415, "unsupported_media_type", "expected multipart/form-data with a boundary")
    return boundary


async def stream_file_part(
    body: AsyncIterator[bytes], content_type: str, upload: MultipartUpload
) -> AsyncIterator[bytes]:
    """Yield the bytes of the form's `file` part while collecting the other fields into `upload`."""
    async for _, chunk in stream_file_parts(body, content_type, upload, max_files=1):
        yield chunk


async def stream_file_parts(
    body: AsyncIterator[bytes], content_type: str, upload: MultipartUpload, *, max_files: int
) -> AsyncIterator[tuple[int, bytes]]:
    """Yield (file index, bytes) of each `file` part in order, collecting the other fields into `upload`."""
    parts: list[_Part] = []
    header_field = bytearray()
    header_value = bytearray()
    pending: list[tuple[int, bytes]] = []
    state: dict[str, Any] = {"current": None, "in_file": False, "ended": False}

    def on_part_begin() -> None:
        state["current"] = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        state["current"].headers[header_field.decode("latin-1").lower()] = header_value.decode("latin-1")
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        part: _Part = state["current"]
        _, params = parse_options_header(part.headers.get("content-disposition", ""))
        part.name = params.get(b"name", b"").decode("utf-8", "replace") or None
        filename = params.get(b"filename")
        part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        part.content_type = part.headers.get("content-type")
        state["in_file"] = part.name == "file"
        if state["in_file"]:
            if len(upload.files) >= max_files:
                message = "only one file part is allowed" if max_files == 1 else f"at most {max_files} files"
                raise Problem(422, "validation_failed", message, errors=[{"field": "file"}])
            upload.files.append(FilePart(part.filename, part.content_type))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["in_file"]:
            pending.append((len(upload.files) - 1, data[start:end]))
            return
        part: _Part = state["current"]
        part.value.extend(data[start:end])
        if len(part.value) > MAX_FIELD_BYTES:
            raise Problem(413, "payload_too_large", f"form field {part.name!r} is too large")

    def on_part_end() -> None:
        part: _Part = state["current"]
        if not state["in_file"] and part.name:
            if len(upload.fields) >= MAX_FIELDS:
                raise Problem(422, "validation_failed", "too many form fields")
            upload.fields[part.name] = part.value.decode("utf-8", "replace")
        parts.append(part)
        state["in_file"] = False

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        boundary_of(content_type),
        callbacks={
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    async for chunk in body:
        try:
            parser.write(chunk)
        except Problem:
            raise
        except Exception as exc:
            raise Problem(400, "malformed_multipart", f"the multipart body could not be parsed: {exc}") from exc
        for index, piece in pending:
            if piece:
                yield index, piece
        pending.clear()
    parser.finalize()
    if not state["ended"]:
        # A body cut short (a dropped connection, a broken client) must not become a job with half a file.
        raise Problem(400, "malformed_multipart", "the multipart body ended before its closing boundary")
    for index, piece in pending:
        if piece:
            yield index, piece
