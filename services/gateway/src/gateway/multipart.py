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
    form = _Form(upload, max_files)
    parser = MultipartParser(boundary_of(content_type), callbacks=form.callbacks())
    async for chunk in body:
        try:
            parser.write(chunk)
        except Problem:
            raise
        except Exception as exc:
            raise Problem(400, "malformed_multipart", f"the multipart body could not be parsed: {exc}") from exc
        for piece in form.take_file_data():
            yield piece
    parser.finalize()
    if not form.ended:
        # A body cut short (a dropped connection, a broken client) must not become a job with half a file.
        raise Problem(400, "malformed_multipart", "the multipart body ended before its closing boundary")
    for piece in form.take_file_data():
        yield piece


class _Form:
    """The parser's callbacks: headers and fields of each part go into the upload, file bytes are held briefly."""

    def __init__(self, upload: MultipartUpload, max_files: int) -> None:
        self._upload = upload
        self._max_files = max_files
        self._part = _Part()
        self._in_file = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._file_data: list[tuple[int, bytes]] = []
        self.ended = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def take_file_data(self) -> list[tuple[int, bytes]]:
        """The file bytes parsed since the last call, as (file index, bytes), empty pieces left out."""
        pieces = [(index, piece) for index, piece in self._file_data if piece]
        self._file_data.clear()
        return pieces

    def _part_begin(self) -> None:
        self._part = _Part()

    def _header_end(self) -> None:
        self._part.headers[self._header_field.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        part = self._part
        _, params = parse_options_header(part.headers.get("content-disposition", ""))
        part.name = params.get(b"name", b"").decode("utf-8", "replace") or None
        filename = params.get(b"filename")
        part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        part.content_type = part.headers.get("content-type")
        self._in_file = part.name == "file"
        if self._in_file:
            if len(self._upload.files) >= self._max_files:
                message = (
                    "only one file part is allowed" if self._max_files == 1 else f"at most {self._max_files} files"
                )
                raise Problem(422, "validation_failed", message, errors=[{"field": "file"}])
            self._upload.files.append(FilePart(part.filename, part.content_type))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            # Mostly the whole chunk the server handed over: kept as it is rather than copied.
            piece = data if start == 0 and end == len(data) else data[start:end]
            self._file_data.append((len(self._upload.files) - 1, piece))
            return
        self._part.value.extend(data[start:end])
        if len(self._part.value) > MAX_FIELD_BYTES:
            raise Problem(413, "payload_too_large", f"form field {self._part.name!r} is too large")

    def _part_end(self) -> None:
        part = self._part
        if not self._in_file and part.name:
            if len(self._upload.fields) >= MAX_FIELDS:
                raise Problem(422, "validation_failed", "too many form fields")
            self._upload.fields[part.name] = part.value.decode("utf-8", "replace")
        self._in_file = False

    def _end(self) -> None:
        self.ended = True
