"""The gateway's HTTP API v1: every call returns JSON or raises a `CliError` that says what went wrong."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

import httpx

from .errors import CliError, Exit, problem_error
from .songs import attachment_name

MEDIA_TYPES = {
    ".wav": "audio/wav",
    ".wave": "audio/wav",
    ".flac": "audio/flac",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/opus",
    ".m4a": "audio/mp4",
    ".mp4": "audio/mp4",
    ".aac": "audio/aac",
    ".aif": "audio/aiff",
    ".aiff": "audio/aiff",
}
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
Progress = Callable[[int], None]


def media_type(path: Path) -> str:
    return MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")


def is_url(song: str) -> bool:
    return urlsplit(song).scheme in ("http", "https")


class _CountingFile:
    """A file whose reads report the bytes sent (httpx reads multipart files in chunks)."""

    def __init__(self, fh: BinaryIO, on_bytes: Progress) -> None:
        self._fh = fh
        self._on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self._on_bytes(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


class Api:
    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 60.0) -> None:
        self.base_url = base_url
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "stemflow-cli"},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
        )

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise CliError(f"{self.base_url} did not answer in time ({type(exc).__name__})", Exit.UNAVAILABLE) from exc
        except httpx.TransportError as exc:
            raise unreachable(self.base_url, exc) from exc
        if response.status_code >= 400:
            raise error_of(response)
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise CliError(
                f"{self.base_url}{path} answered HTTP {response.status_code} without JSON",
                Exit.UNAVAILABLE,
                hint="check --url / STEMFLOW_URL: it must point at the Stemflow gateway",
            ) from exc

    async def submit_file(
        self, path: Path, options: dict[str, Any], on_bytes: Progress | None = None
    ) -> dict[str, Any]:
        """Upload the song as the request body (nothing for the gateway to parse), the options in the query."""
        params = {k: _form_value(v) for k, v in options.items()}
        with contextlib.ExitStack() as files_open:
            name, fh, content_type = _file_part(files_open, path, on_bytes)
            headers = {
                "Idempotency-Key": str(uuid.uuid4()),
                "Content-Type": content_type,
                "Content-Disposition": _disposition(name),
                "Content-Length": str(os.fstat(fh.fileno()).st_size),
            }
            return await self._json("POST", "/v1/jobs", params=params, content=_chunks(fh), headers=headers)

    async def submit_batch_files(
        self, paths: list[Path], options: dict[str, Any], on_bytes: list[Progress | None] | None = None
    ) -> dict[str, Any]:
        """One batch of uploads with shared options (POST /v1/batches): the batch, its jobs in the files' order."""
        fields = {k: _form_value(v) for k, v in options.items()}
        with contextlib.ExitStack() as files_open:
            files = [
                ("file", _file_part(files_open, path, on_bytes[index] if on_bytes else None))
                for index, path in enumerate(paths)
            ]
            return await self._json("POST", "/v1/batches", files=files, data=fields)

    async def submit_batch_urls(self, urls: list[str], options: dict[str, Any]) -> dict[str, Any]:
        return await self._json("POST", "/v1/batches", json={"source_urls": urls, **options})

    async def submit_url(self, url: str, options: dict[str, Any]) -> dict[str, Any]:
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        return await self._json("POST", "/v1/jobs", json={"source_url": url, **options}, headers=headers)

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/jobs/{job_id}")

    async def jobs(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return await self._json("GET", "/v1/jobs", params=params)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/v1/jobs/{job_id}/cancel")

    async def delete(self, job_id: str) -> None:
        await self._request("DELETE", f"/v1/jobs/{job_id}")

    async def models(self) -> dict[str, Any]:
        """Every model, its stem counts and whether a worker serves it now (GET /v1/models)."""
        return await self._json("GET", "/v1/models")

    async def analysis(self, job_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/jobs/{job_id}/analysis")

    async def create_mix(self, job_id: str, options: dict[str, Any]) -> dict[str, Any]:
        """Ask for a practice mix (POST /v1/jobs/{id}/mixes): the new one, or the same one asked for before."""
        return await self._json("POST", f"/v1/jobs/{job_id}/mixes", json=options)

    async def mix(self, job_id: str, mix_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/jobs/{job_id}/mixes/{mix_id}")

    async def page_config(self) -> dict[str, Any]:
        """The web page's `/config.json` (where the notifier is), or {} where the gateway serves none."""
        try:
            response = await self._http.get("/config.json")
            return response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}

    async def download(self, url: str, dest: Path, on_bytes: Progress | None = None) -> Path:
        """Stream `url` (a link of the job document) to `dest`, via a `.part` file so nothing half-written stays."""
        return await self.download_to(url, dest.parent, dest.name, on_bytes, named_by_server=False)

    async def download_to(
        self,
        url: str,
        folder: Path,
        fallback: str,
        on_bytes: Progress | None = None,
        *,
        named_by_server: bool = True,
    ) -> Path:
        """Stream `url` into `folder` under the name its `Content-Disposition` gives (the song's and the stem's,
        as the web page saves it), else `fallback`; via a `.part` file so nothing half-written stays."""
        # The link's path and query (a target's stems are `?target=` of the job's), on the configured gateway.
        path = urlsplit(url)._replace(scheme="", netloc="").geturl() if is_url(url) else url
        part: Path | None = None
        try:
            async with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_of(response)
                given = attachment_name(response.headers.get("content-disposition")) if named_by_server else None
                dest = folder / (given or fallback)
                part = dest.with_name(dest.name + ".part")
                with open(part, "wb") as fh:
                    async for chunk in response.aiter_bytes():
                        fh.write(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
        except httpx.TransportError as exc:
            if part is not None:
                part.unlink(missing_ok=True)
            raise unreachable(self.base_url, exc) from exc
        except BaseException:
            if part is not None:
                part.unlink(missing_ok=True)
            raise
        assert part is not None
        os.replace(part, dest)
        return dest


def unreachable(base_url: str, exc: Exception) -> CliError:
    return CliError(
        f"cannot reach Stemflow at {base_url}: {exc or type(exc).__name__}",
        Exit.UNAVAILABLE,
        hint="is the gateway running (`make up`)? check --url / STEMFLOW_URL",
    )


def error_of(response: httpx.Response) -> CliError:
    """A `CliError` from an error answer, problem+json or not."""
    retry_after = response.headers.get("Retry-After")
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        body = None
    if isinstance(body, dict) and "code" in body:
        return problem_error(response.status_code, body, retry_after=retry_after)
    error = problem_error(response.status_code, {}, retry_after=retry_after)
    error.message = f"HTTP {response.status_code} {response.reason_phrase} from {response.request.url}"
    error.hint = error.hint or "check --url / STEMFLOW_URL: it must point at the Stemflow gateway"
    return error


def _file_part(files_open: contextlib.ExitStack, path: Path, on_bytes: Progress | None) -> tuple[str, Any, str]:
    """A file of a multipart upload, open until `files_open` closes, counting what is sent when asked."""
    try:
        fh = files_open.enter_context(open(path, "rb"))  # noqa: SIM115 - closed with files_open
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", Exit.USAGE) from exc
    upload: Any = _CountingFile(fh, on_bytes) if on_bytes else fh
    return path.name, upload, media_type(path)


async def _chunks(fh: Any, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
    while chunk := fh.read(size):
        yield chunk


def _disposition(name: str) -> str:
    """A file name as `Content-Disposition` (RFC 6266): an ASCII fallback, then the exact name in UTF-8."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def _form_value(value: Any) -> str:
    """A job option as a form field: booleans in lower case, lists (targets) comma-separated."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)
