"""The gateway through MongoDB and Redis outages: 503 while the database is down, degraded caching without
Redis, and recovery by itself once they are back. Private servers are started for this, so nothing else
running on the machine is disturbed."""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio as redis
import soundfile as sf
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect, ConnectionFailure

from gateway.main import create_app
from gateway.settings import Settings
from stemflow_dev.fixtures import announce_models
from stemflow_dev.stack import LocalPorts, StackUrls, ensure_stack, stop_stack
from stemflow_shared.auth import ApiKeys

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory, stack: StackUrls) -> Any:
    state = tmp_path_factory.mktemp("private-stack")
    ports = LocalPorts(mongodb=_free_port(), redis=_free_port())
    urls = ensure_stack(state, amqp_url=stack.amqp_url, ports=ports)
    yield state, ports, urls
    stop_stack(state)


@pytest_asyncio.fixture(scope="module")
async def gateway(private: Any, isolation: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    _, _, urls = private
    settings = Settings(
        amqp_url=urls.amqp_url,
        mongodb_url=urls.mongodb_url,
        redis_url=urls.redis_url,
        mongodb_db="outages",
        stemflow_namespace=f"{isolation.namespace}-outages",
        blob_dir=str(tmp_path_factory.mktemp("blobs")),
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30) as client:
            key = await ApiKeys(app.state.jobs.repo.jobs.database).create("outage")
            client.headers["Authorization"] = f"Bearer {key}"
            yield client


@pytest_asyncio.fixture(autouse=True)
async def served(private: Any, isolation: Any) -> None:
    """Every model announced (no separator runs here), again before each test: an outage empties Redis."""
    announcer = redis.from_url(private[2].redis_url)
    await announce_models(announcer, f"{isolation.namespace}-outages")
    await announcer.aclose()


def _wav() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((22050, 1), dtype=np.float32) + 0.1, 22050, format="WAV")
    return buffer.getvalue()


async def _submit(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.post("/v1/jobs", files={"file": ("a.wav", _wav(), "audio/wav")})
    assert response.status_code == 202, response.text
    return response.json()


async def test_a_redis_outage_degrades_caching_without_failing_reads(gateway: httpx.AsyncClient, private: Any) -> None:
    state, ports, urls = private
    job = await _submit(gateway)
    direct = redis.from_url(urls.redis_url)
    await direct.shutdown(nosave=True)
    await direct.aclose()
    read = await gateway.get(f"/v1/jobs/{job['id']}")
    assert read.status_code == 200 and read.json()["id"] == job["id"]
    listed = await gateway.get("/v1/jobs")
    assert listed.json()["items"][0]["id"] == job["id"]
    # Writes too: a new job is accepted, and a cancel ends the job (the workers' stop flag waits for Redis).
    other = await _submit(gateway)
    cancelled = await gateway.post(f"/v1/jobs/{other['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    ensure_stack(state, amqp_url=urls.amqp_url, ports=ports)
    again = await gateway.get(f"/v1/jobs/{job['id']}")
    assert again.status_code == 200
    assert (await gateway.get("/readyz")).status_code == 200


async def test_the_gateway_answers_503_while_mongodb_is_down_and_recovers_by_itself(
    gateway: httpx.AsyncClient, private: Any
) -> None:
    state, ports, urls = private
    job = await _submit(gateway)
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(urls.mongodb_url, directConnection=True)
    try:
        await mongo.admin.command("shutdown", force=True)
    except (AutoReconnect, ConnectionFailure):
        pass  # the server closes the connection as it goes down
    finally:
        await mongo.close()
    down = await gateway.get("/v1/jobs?limit=1")
    assert down.status_code == 503
    assert down.headers["content-type"].startswith("application/problem+json")
    assert down.json()["code"] == "database_unavailable" and down.headers["retry-after"]
    assert (await gateway.get("/readyz")).status_code == 503
    await asyncio.to_thread(ensure_stack, state, amqp_url=urls.amqp_url, ports=ports)
    back = await gateway.get(f"/v1/jobs/{job['id']}")
    assert back.status_code == 200 and back.json()["id"] == job["id"]


def test_private_servers_are_not_the_shared_ones(private: Any, stack: StackUrls) -> None:
    _, _, urls = private
    assert urls.mongodb_url != stack.mongodb_url and urls.redis_url != stack.redis_url
    assert Path(private[0]).is_dir()
