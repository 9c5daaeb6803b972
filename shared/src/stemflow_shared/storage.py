"""The blob store: one small interface, a filesystem backend and a MongoDB GridFS backend.

Keys are relative, slash-separated and made by this project (see the key
helpers below); they are validated so that no user-supplied text reaches a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .mongo import mongodb_ready

CHUNK = 1024 * 1024
_KEY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")


class BlobNotFound(KeyError):
    """No blob under that key."""


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    sha256: str | None = None


def check_key(key: str) -> str:
    """Refuse keys that could escape the store (absolute, '..', odd characters)."""
    if len(key) > 512 or not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid blob key {key!r}")
    return key


# --- key layout, defined once -----------------------------------------------------


def job_prefix(job_id: str) -> str:
    return check_key(f"jobs/{job_id}")


def upload_key(job_id: str) -> str:
    return f"{job_prefix(job_id)}/upload"


def normalised_key(job_id: str) -> str:
    return f"{job_prefix(job_id)}/audio.wav"


def stem_key(job_id: str, stem: str, extension: str, target: str | None = None) -> str:
    """Where a stem lives; the stems of each target of a job with several have a folder of their own."""
    if target is None:
        return check_key(f"{job_prefix(job_id)}/stems/{stem}.{extension}")
    return check_key(f"{job_prefix(job_id)}/stems/{target}/{stem}.{extension}")


def stems_prefix(job_id: str, target: str | None = None) -> str:
    """The folder of a job's stems (of one target's, when given): what a failed separation removes."""
    return check_key(f"{job_prefix(job_id)}/stems" + (f"/{target}" if target else ""))


class BlobStore(Protocol):
    async def put_stream(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None) -> BlobInfo: ...

    async def put_file(self, key: str, path: Path) -> BlobInfo: ...

    def local_path(self, key: str) -> contextlib.AbstractAsyncContextManager[Path]: ...

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]: ...

    async def size(self, key: str) -> int: ...

    async def exists(self, key: str) -> bool: ...

    async def delete_prefix(self, prefix: str) -> int: ...

    async def ping(self) -> bool: ...


class TooLarge(Exception):
    """A stream went past its byte limit; nothing was kept."""


def _counted(total: int, chunk: bytes, max_bytes: int | None) -> int:
    """The running size with `chunk`; TooLarge past `max_bytes` (a plain call: no generator layer per chunk)."""
    total += len(chunk)
    if max_bytes is not None and total > max_bytes:
        raise TooLarge(f"more than {max_bytes} bytes")
    return total


class FilesystemBlobStore:
    """Blobs as files under one root (a shared volume when several nodes run)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _temp(self) -> Path:
        return self._tmp / uuid.uuid4().hex

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None) -> BlobInfo:
        target, temp = self._path(key), self._temp()
        digest = hashlib.sha256()
        size = 0
        try:
            with open(temp, "wb", buffering=0) as fh:
                async for chunk in chunks:
                    size = _counted(size, chunk, max_bytes)
                    digest.update(chunk)
                    # Request chunks are small; a write to the page cache is cheaper than a thread hop.
                    fh.write(chunk)
            # A rename and a mkdir that is nearly always a no-op: cheaper here than a thread hop too.
            _publish_file(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return BlobInfo(key, size, digest.hexdigest())

    async def put_file(self, key: str, path: Path) -> BlobInfo:
        target, temp = self._path(key), self._temp()
        try:
            await asyncio.to_thread(shutil.copyfile, path, temp)
            await asyncio.to_thread(_publish_file, temp, target)
        finally:
            temp.unlink(missing_ok=True)
        return BlobInfo(key, target.stat().st_size)

    @contextlib.asynccontextmanager
    async def local_path(self, key: str) -> AsyncIterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        yield path

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed in the finally below
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc
        try:
            fh.seek(start)
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                want = CHUNK if remaining is None else min(CHUNK, remaining)
                chunk = await asyncio.to_thread(fh.read, want)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            fh.close()

    async def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    async def delete_prefix(self, prefix: str) -> int:
        path = self._path(prefix)
        if path.is_file():
            path.unlink()
            return 1
        if not path.is_dir():
            return 0
        count = sum(1 for p in path.rglob("*") if p.is_file())
        await asyncio.to_thread(shutil.rmtree, path, True)
        return count

    async def ping(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK)


def _publish_file(temp: Path, target: Path) -> None:
    """Make a finished file visible under its key atomically (readers never see half a file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, target)


class GridFSBlobStore:
    """Blobs in MongoDB GridFS, for nodes that share no volume."""

    def __init__(self, database: Any, bucket: str = "blobs", temp_dir: Path | None = None) -> None:
        from gridfs import AsyncGridFSBucket

        self._db = database
        self._bucket = AsyncGridFSBucket(database, bucket_name=bucket, chunk_size_bytes=CHUNK)
        self._files = database[f"{bucket}.files"]
        self._temp_dir = temp_dir

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None) -> BlobInfo:
        check_key(key)
        digest = hashlib.sha256()
        size = 0
        stream = self._bucket.open_upload_stream(key, metadata={"complete": False})
        try:
            async for chunk in chunks:
                size = _counted(size, chunk, max_bytes)
                digest.update(chunk)
                await stream.write(chunk)
            await stream.close()
        except BaseException:
            await stream.abort()
            raise
        await self._supersede(key, stream._id)
        return BlobInfo(key, size, digest.hexdigest())

    async def put_file(self, key: str, path: Path) -> BlobInfo:
        async def chunks() -> AsyncIterator[bytes]:
            with open(path, "rb") as fh:
                while chunk := await asyncio.to_thread(fh.read, CHUNK):
                    yield chunk

        return await self.put_stream(key, chunks())

    async def _supersede(self, key: str, new_id: Any) -> None:
        """Keep only the newest revision of a key, so a retried write replaces the old one."""
        async for doc in self._files.find({"filename": key, "_id": {"$ne": new_id}}, {"_id": 1}):
            with contextlib.suppress(Exception):
                await self._bucket.delete(doc["_id"])

    async def _newest(self, key: str) -> dict[str, Any]:
        doc = await self._files.find_one({"filename": check_key(key)}, sort=[("uploadDate", -1)])
        if doc is None:
            raise BlobNotFound(key)
        return doc

    @contextlib.asynccontextmanager
    async def local_path(self, key: str) -> AsyncIterator[Path]:
        doc = await self._newest(key)
        fd, name = tempfile.mkstemp(prefix="stemflow-", dir=self._temp_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                await self._bucket.download_to_stream(doc["_id"], fh)
            yield path
        finally:
            path.unlink(missing_ok=True)

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        doc = await self._newest(key)
        stream = await self._bucket.open_download_stream(doc["_id"])
        try:
            await stream.seek(start)
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                chunk = await stream.readchunk()
                if not chunk:
                    break
                if remaining is not None:
                    chunk = chunk[:remaining]
                    remaining -= len(chunk)
                yield chunk
        finally:
            await stream.close()

    async def size(self, key: str) -> int:
        return int((await self._newest(key))["length"])

    async def exists(self, key: str) -> bool:
        return await self._files.find_one({"filename": check_key(key)}, {"_id": 1}) is not None

    async def delete_prefix(self, prefix: str) -> int:
        check_key(prefix)
        query = {"filename": {"$regex": f"^{re.escape(prefix)}(/|$)"}}
        count = 0
        async for doc in self._files.find(query, {"_id": 1}):
            with contextlib.suppress(Exception):
                await self._bucket.delete(doc["_id"])
                count += 1
        return count

    async def ping(self) -> bool:
        return await mongodb_ready(self._db)


def make_blob_store(settings: Any, mongo_database_factory: Callable[[], Any] | None = None) -> BlobStore:
    """The blob store chosen by BlobSettings."""
    if settings.blob_backend == "gridfs":
        if mongo_database_factory is None:
            raise ValueError("the gridfs backend needs a MongoDB database")
        return GridFSBlobStore(mongo_database_factory())
    return FilesystemBlobStore(Path(settings.blob_dir))


async def iterate_file(path: Path, chunk: int = CHUNK) -> AsyncIterator[bytes]:
    """Read a file in chunks off the event loop."""
    with open(path, "rb") as fh:
        while data := await asyncio.to_thread(fh.read, chunk):
            yield data
