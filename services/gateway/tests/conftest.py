"""The gateway app in-process, on the real MongoDB, Redis and RabbitMQ of the test run."""

from __future__ import annotations

import contextlib
import io
import types
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf

from gateway.main import create_app
from gateway.settings import Settings
from stemflow_dev.fixtures import announce_models, delete_namespace_keys
from stemflow_dev.stack import StackUrls
from stemflow_shared.auth import ApiKeys
from stemflow_shared.events import (
    AUDIO_INGESTED,
    SEPARATION_COMPLETED,
    AudioInfo,
    AudioIngested,
    JobOptions,
    SeparationCompleted,
    SourceInfo,
    StemInfo,
    make_event,
)
from stemflow_shared.storage import stem_key

PROBLEM = "application/problem+json"


def wav_bytes(seconds: float = 1.0, sr: int = 22050) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format="WAV")
    return buffer.getvalue()


@pytest_asyncio.fixture(scope="session")
async def base_env(
    base_env: dict[str, str], stack: StackUrls, redis_client: Any, broker_cleanup: None
) -> AsyncIterator[dict[str, str]]:
    """The run's environment with a namespace and a database of the gateway tests' own.

    Other tests of the run start real services in the run's namespace (tests/integration's `system`); they
    would take these tests' jobs. Removed at the end: the database and the Redis keys here, the broker's
    exchanges and queues with the run's derived namespaces (stemflow_dev.fixtures.DERIVED_NAMESPACES).
    """
    from pymongo import AsyncMongoClient

    namespace, database = f"{base_env['STEMFLOW_NAMESPACE']}-gw", f"{base_env['MONGODB_DB']}_gw"
    yield {**base_env, "STEMFLOW_NAMESPACE": namespace, "MONGODB_DB": database}
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(stack.mongodb_url)
    await mongo.drop_database(database)
    await mongo.close()
    await delete_namespace_keys(redis_client, namespace)


@pytest_asyncio.fixture(scope="session")
async def mongo_db(mongo_db: Any, base_env: dict[str, str]) -> Any:
    """The gateway tests' own database (see `base_env`)."""
    return mongo_db.client[base_env["MONGODB_DB"]]


@pytest_asyncio.fixture(scope="session", autouse=True)
async def served_models(base_env: dict[str, str], redis_client: Any) -> AsyncIterator[None]:
    """Every model is served in the gateway tests' namespace unless a test says otherwise."""
    await announce_models(redis_client, base_env["STEMFLOW_NAMESPACE"])
    yield


@contextlib.asynccontextmanager
async def running_app(base_env: dict[str, str], **overrides: Any) -> AsyncIterator[Any]:
    """A gateway app with its lifespan running, settings from the test environment plus `overrides`."""
    env = {k.lower(): v for k, v in base_env.items()}
    settings = Settings(**{**env, "rate_limit_per_minute": 100_000, "max_upload_bytes": 2_000_000, **overrides})
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@contextlib.asynccontextmanager
async def http_client(app: Any, *, raise_app_exceptions: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c


@pytest_asyncio.fixture(scope="module")
async def app(base_env: dict[str, str]) -> AsyncIterator[Any]:
    async with running_app(base_env) as application:
        yield application


@pytest_asyncio.fixture(scope="module")
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(app) as c:
        yield c


async def new_key(app: Any, owner: str) -> dict[str, str]:
    key = await ApiKeys(app.state.jobs.repo.jobs.database).create(owner)
    return {"Authorization": f"Bearer {key}"}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["code"] == code
    assert body["title"] and body["detail"] and body["type"].endswith(code)
    return body


async def submit(client: httpx.AsyncClient, headers: dict[str, str], **fields: str) -> httpx.Response:
    files = {"file": ("song.wav", wav_bytes(), "audio/wav")}
    return await client.post("/v1/jobs", headers=headers, files=files, data=fields)


def upload_scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of a `POST /v1/jobs` with these headers, for tests that drive `receive` themselves."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"gateway"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("gateway", 80),
    }


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def completed_job(
    app: Any, client: httpx.AsyncClient, headers: dict[str, str], fingerprint: str = "f", **fields: str
) -> str:
    """A submitted job taken to `completed` by real stage events (two stems, no analysis)."""
    job = (await submit(client, headers, analyze="false", **fields)).json()
    jobs = app.state.jobs
    stems = []
    for name, payload in (("vocals", bytes(range(256)) * 40), ("accompaniment", b"A" * 5000)):
        key = stem_key(job["id"], name, "wav")
        info = await jobs.blobs.put_stream(key, _once(payload))
        stems.append(
            StemInfo(name=name, format="wav", media_type="audio/wav", blob_key=key, size=info.size, duration_s=1)
        )
    audio = AudioIngested(
        job_id=job["id"],
        owner="x",
        options=JobOptions(analyze=False),
        audio=AudioInfo(
            blob_key="a", duration_s=1, sample_rate=44100, channels=2, frames=44100, fingerprint=fingerprint
        ),
        source=SourceInfo(format="WAV", sample_rate=22050, channels=1, duration_s=1),
    )
    await jobs.apply_event(make_event(AUDIO_INGESTED, audio, source="/t"))
    done = SeparationCompleted(job_id=job["id"], model="htdemucs", device="cpu", precision="float32", stems=stems)
    await jobs.apply_event(make_event(SEPARATION_COMPLETED, done, source="/t"))
    return job["id"]


@pytest.fixture(scope="module")
def helpers() -> Any:
    """Test helpers, handed out as a fixture (test modules cannot import conftest)."""
    return types.SimpleNamespace(
        new_key=new_key,
        wav_bytes=wav_bytes,
        assert_problem=assert_problem,
        submit=submit,
        upload_scope=upload_scope,
        completed_job=completed_job,
        running_app=running_app,
        announce_models=announce_models,
        http_client=http_client,
    )
