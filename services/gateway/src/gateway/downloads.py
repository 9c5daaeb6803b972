"""Results of finished jobs: one stem (HTTP Range), all stems as a streamed zip, the full analysis."""

from __future__ import annotations

import re
import unicodedata
import zipfile
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from typing import Annotated, Any
from urllib.parse import quote, unquote, urlsplit

import orjson
from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse

from stemflow_shared.auth import Principal
from stemflow_shared.storage import BlobNotFound

from .deps import JobsDep, Owner, not_found
from .jobs import Jobs
from .problems import Problem

router = APIRouter(prefix="/v1")
TargetQuery = Annotated[
    str | None, Query(max_length=64, description="For a job with several targets: which one (default: the primary)")
]


def _stems_of(doc: dict[str, Any], target: str | None) -> list[dict[str, Any]]:
    """The stems of the job's primary separation, or of one named target."""
    if target is None:
        return doc["result"]["stems"]
    found = ((doc.get("result") or {}).get("targets") or {}).get(target)
    if found is None:
        raise Problem(404, "target_not_found", f"job {doc['_id']} has no finished target {target!r}")
    return found["stems"]


async def _finished_job(jobs: Jobs, job_id: str, who: Principal) -> dict[str, Any]:
    doc = await jobs.document(job_id, who.owner)
    if doc is None:
        raise not_found(job_id)
    if doc["status"] != "completed":
        raise Problem(409, "job_not_completed", f"job {job_id} is {doc['status']}", job_status=doc["status"])
    return doc


# What a file name may not hold on common systems (Windows is the strictest), and control characters.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]+')
_TITLE_MAX = 100
EN_DASH = "\u2013"  # between the song and the stem: 'Song \u2013 Vocals.flac'


def song_title(doc: dict[str, Any]) -> str:
    """What people call the song: the uploaded file's name or the URL's last part, without extension; else the id."""
    source = doc.get("input") or {}
    name = source.get("filename") or ""
    if not name and source.get("source_url"):
        name = unquote(PurePosixPath(urlsplit(source["source_url"]).path).name)
    stem = PurePosixPath(name.replace("\\", "/")).name
    title = stem.rsplit(".", 1)[0] if "." in stem.strip(".") else stem
    title = " ".join(_UNSAFE.sub(" ", unicodedata.normalize("NFC", title)).split()).strip(" .")
    return title[:_TITLE_MAX].rstrip(" .") or str(doc.get("_id") or doc.get("id"))


def stem_filename(doc: dict[str, Any], stem: str, fmt: str, target: str | None = None) -> str:
    """'Song - Vocals.flac' with an en dash ('Song - Vocals (htdemucs_6s-6).flac' for a target asked by name)."""
    label = stem.replace("_", " ").capitalize()
    return f"{song_title(doc)} {EN_DASH} {label}{f' ({target})' if target else ''}.{fmt}"


def zip_filename(doc: dict[str, Any], target: str | None = None) -> str:
    """'Song (stems).zip' ('Song (stems, htdemucs_6s-6).zip' for a target asked by name)."""
    return f"{song_title(doc)} (stems{f', {target}' if target else ''}).zip"


def attachment(filename: str) -> str:
    """Content-Disposition of RFC 6266: an ASCII fallback for old clients, the UTF-8 name in `filename*`."""
    fallback = unicodedata.normalize("NFKD", filename.replace(EN_DASH, "-")).encode("ascii", "ignore").decode()
    fallback = re.sub(r'["\\%]', "", fallback) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.get("/jobs/{job_id}/stems/{stem}")
async def download_stem(
    job_id: str,
    stem: str,
    who: Owner,
    jobs: JobsDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
    target: TargetQuery = None,
) -> Response:
    """One stem file; a single byte range is honoured."""
    doc = await _finished_job(jobs, job_id, who)
    info = next((s for s in _stems_of(doc, target) if s["name"] == stem), None)
    if info is None:
        raise Problem(404, "stem_not_found", f"job {job_id} has no stem {stem!r}")
    try:
        size = await jobs.blob_size(info["blob_key"])
    except BlobNotFound as exc:
        raise Problem(404, "stem_not_found", f"the file of stem {stem!r} is gone") from exc
    headers = {
        "Content-Disposition": attachment(stem_filename(doc, stem, info["format"], target)),
        "ETag": f'"{job_id}-{target or ""}-{stem}-{size}"',
    }
    return ranged_file(jobs, info["blob_key"], size, info["media_type"], range_header, headers)


def ranged_file(
    jobs: Jobs, blob_key: str, size: int, media_type: str, range_header: str | None, headers: dict[str, str]
) -> StreamingResponse:
    """A stored file, whole (200) or one byte range of it (206 with Content-Range; 416 when out of range)."""
    headers = {"Accept-Ranges": "bytes", **headers}
    start, end, status_code = 0, size, 200
    if range_header:
        start, end = _parse_range(range_header, size)
        status_code = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(
        jobs.blob_chunks(blob_key, start, end), status_code=status_code, media_type=media_type, headers=headers
    )


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """[start, end) of a single `bytes=` range; 416 when it cannot be served."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or match.groups() == ("", ""):
        raise Problem(
            416,
            "range_not_satisfiable",
            "only one bytes=a-b range is supported",
            headers={"Content-Range": f"bytes */{size}"},
        )
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size
    else:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    if start >= size or start >= end:
        raise Problem(
            416, "range_not_satisfiable", f"the file has {size} bytes", headers={"Content-Range": f"bytes */{size}"}
        )
    return start, end


@router.get("/jobs/{job_id}/stems.zip")
async def download_zip(job_id: str, who: Owner, jobs: JobsDep, target: TargetQuery = None) -> Response:
    """Every stem in one zip, streamed as it is built."""
    doc = await _finished_job(jobs, job_id, who)
    stems = _stems_of(doc, target)
    if not stems:
        raise Problem(404, "stem_not_found", f"job {job_id} has no stems")
    return StreamingResponse(
        _zip_stream(jobs, stems),
        media_type="application/zip",
        headers={"Content-Disposition": attachment(zip_filename(doc, target))},
    )


class _Sink:
    """A write-only file for zipfile that hands its bytes to the response as they come."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.offset = 0

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        return None

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


async def _zip_stream(jobs: Jobs, stems: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    sink = _Sink()
    # Audio does not deflate well; storing keeps the zip fast to build and to open.
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:  # type: ignore[arg-type]
        for stem in stems:
            arcname = f"{stem['name']}.{stem['format']}"
            with archive.open(arcname, mode="w", force_zip64=True) as entry:
                async for chunk in jobs.blob_chunks(stem["blob_key"]):
                    entry.write(chunk)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


@router.get("/jobs/{job_id}/analysis")
async def get_analysis(job_id: str, who: Owner, jobs: JobsDep) -> Response:
    """The full analysis, beat times and energy curve included."""
    doc = await jobs.document(job_id, who.owner)
    if doc is None:
        raise not_found(job_id)
    analysis = (doc.get("result") or {}).get("analysis")
    if analysis is None:
        raise Problem(409, "analysis_not_ready", f"job {job_id} has no analysis yet", job_status=doc["status"])
    return Response(orjson.dumps(analysis), media_type="application/json")
