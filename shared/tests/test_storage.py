"""The blob store contract, held by both backends: the filesystem and GridFS (as the gridfs-blobs component
deploys it: make_blob_store with BLOB_BACKEND=gridfs on the run's real MongoDB)."""

from __future__ import annotations

import hashlib
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from stemflow_shared.storage import BlobNotFound, TooLarge, check_key, job_prefix, make_blob_store, stem_key

DATA = bytes(range(256)) * 5000  # 1.28 MB: several chunks of each backend


async def chunks(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest_asyncio.fixture(params=["filesystem", "gridfs"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, stack: Any, isolation: Any) -> AsyncIterator[Any]:
    settings = types.SimpleNamespace(blob_backend=request.param, blob_dir=tmp_path / "blobs")
    if request.param == "filesystem":
        yield make_blob_store(settings)
        return
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[Any] = AsyncMongoClient(stack.mongodb_url)
    database = client[f"{isolation.mongodb_db}_blobs"]
    try:
        yield make_blob_store(settings, lambda: database)
    finally:
        await client.drop_database(database.name)
        await client.close()


async def read_all(store: Any, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, start, end)])


async def test_a_blob_is_stored_whole_hashed_and_read_back(store: Any) -> None:
    key = stem_key("j1", "vocals", "wav")
    info = await store.put_stream(key, chunks(DATA))
    assert (info.key, info.size, info.sha256) == (key, len(DATA), hashlib.sha256(DATA).hexdigest())
    assert await store.exists(key) and await store.size(key) == len(DATA)
    assert await read_all(store, key) == DATA
    assert await read_all(store, key, 1000, 250_000) == DATA[1000:250_000]
    assert await read_all(store, key, len(DATA) - 7) == DATA[-7:]
    async with store.local_path(key) as path:
        assert Path(path).read_bytes() == DATA
    assert await store.ping()


async def test_a_newer_blob_replaces_the_older_one(store: Any) -> None:
    key = stem_key("j2", "bass", "flac")
    await store.put_stream(key, chunks(b"old" * 10))
    await store.put_stream(key, chunks(b"new!"))
    assert await read_all(store, key) == b"new!" and await store.size(key) == 4


async def test_too_large_keeps_nothing(store: Any) -> None:
    key = stem_key("j3", "drums", "wav")
    with pytest.raises(TooLarge):
        await store.put_stream(key, chunks(DATA), max_bytes=len(DATA) - 1)
    assert not await store.exists(key)


async def test_missing_blobs_are_blob_not_found(store: Any) -> None:
    key = stem_key("j4", "other", "wav")
    with pytest.raises(BlobNotFound):
        await store.size(key)
    with pytest.raises(BlobNotFound):
        await read_all(store, key)
    assert not await store.exists(key)


async def test_delete_prefix_removes_a_folder_and_nothing_beside_it(store: Any) -> None:
    for key in (stem_key("j5", "a", "wav"), stem_key("j5", "b", "wav", target="t-4"), f"{job_prefix('j5')}/upload"):
        await store.put_stream(key, chunks(b"x"))
    beside = f"{job_prefix('j55')}/upload"  # shares the prefix's text, not its folder
    await store.put_stream(beside, chunks(b"y"))
    assert await store.delete_prefix(job_prefix("j5")) == 3
    assert not await store.exists(stem_key("j5", "a", "wav"))
    assert await read_all(store, beside) == b"y"
    assert await store.delete_prefix(job_prefix("j5")) == 0


BAD_KEYS = [
    "../etc/passwd",
    "jobs/../../etc/passwd",
    "jobs/a/../../b",
    "/etc/passwd",
    "jobs//a",
    "jobs/a/",
    ".hidden",
    "jobs/a\x00b",
    "jobs/a\nb",
    "jobs/\u00e9",
    "jobs\\a",
    "",
    "a" * 513,
]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_no_key_escapes_the_store(store: Any, key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)
    with pytest.raises(ValueError):
        await store.put_stream(key, chunks(b"x"))
    with pytest.raises(ValueError):
        await store.delete_prefix(key)
    with pytest.raises((ValueError, BlobNotFound)):
        await store.size(key)


def test_keys_the_project_makes_are_valid() -> None:
    assert check_key(stem_key("0123abcd", "vocals", "wav", target="htdemucs_6s-6")) == (
        "jobs/0123abcd/stems/htdemucs_6s-6/vocals.wav"
    )
