"""The notifier in-process (uvicorn on a loopback port) on the real RabbitMQ, MongoDB and Redis of the test run.

The notifier tests use a namespace of their own, so the notifier of the integration
system (another namespace) never takes their webhooks or events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import types
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
import websockets
from websockets.asyncio.client import ClientConnection

from notifier.main import create_app, server_config
from notifier.settings import Settings
from stemflow_dev.fixtures import delete_namespace, delete_namespace_keys
from stemflow_shared.auth import ApiKeys
from stemflow_shared.events import (
    JOB_CANCELLED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_PROGRESS,
    AnalysisResult,
    ErrorInfo,
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobProgressed,
    Progress,
    StageProgress,
    make_event,
)
from stemflow_shared.messaging import Broker
from stemflow_shared.topology import NOTIFIER_QUEUE, Names

WEBHOOK_SECRET = "test-webhook-secret"
TIMEOUT_S = 20.0


@dataclass
class Running:
    """One notifier server in this process."""

    app: Any
    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


@contextlib.asynccontextmanager
async def running_notifier(
    env: dict[str, str], send_buffer: int | None = None, **overrides: Any
) -> AsyncIterator[Running]:
    """A notifier serving on a free port, returned once its lifespan has started (consumers bound).

    `send_buffer` caps the kernel's send buffer of every connection it accepts (Linux autotunes it up to
    `net.ipv4.tcp_wmem`'s maximum, several MB, which is more than some tests send to a stalled client).
    """
    settings = Settings(**{**{k.lower(): v for k, v in env.items()}, **overrides})
    sock = socket.socket()
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)  # accepted sockets inherit it
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    server = uvicorn.Server(server_config(create_app(settings), settings))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    running = Running(server.config.app, server, task, sock.getsockname()[1])
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
            ready = asyncio.create_task(http.get(f"{running.http_url}/readyz"))
            await asyncio.wait({ready, task}, timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done() or ready.result().status_code != 200:
                ready.cancel()
                raise RuntimeError("the notifier did not start")
        yield running
    finally:
        if not task.done():
            await running.stop()


@pytest_asyncio.fixture(scope="session")
async def notifier_env(base_env: dict[str, str], isolation: Any, redis_client: Any) -> AsyncIterator[dict[str, str]]:
    """The notifier tests' environment; their Redis keys are removed at the end."""
    namespace = f"{isolation.namespace}-nt"
    yield {
        **base_env,
        "STEMFLOW_NAMESPACE": namespace,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_BACKOFF_S": "0.05",
        "WEBHOOK_MAX_ATTEMPTS": "4",
        "LOG_FORMAT": "text",
    }
    await delete_namespace_keys(redis_client, namespace)


@pytest_asyncio.fixture(scope="session")
async def broker(notifier_env: dict[str, str]) -> AsyncIterator[Broker]:
    """A publisher in the notifier tests' namespace; the namespace is removed at the end."""
    namespace = notifier_env["STEMFLOW_NAMESPACE"]
    publisher = await Broker(notifier_env["AMQP_URL"], Names(namespace), "notifier-tests").connect()
    try:
        yield publisher
    finally:
        await publisher.close()
        await _delete_replica_queues(notifier_env["AMQP_URL"], Names(namespace))
        await delete_namespace(notifier_env["AMQP_URL"], namespace)


async def _delete_replica_queues(amqp_url: str, names: Names) -> None:
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    try:
        for replica in REPLICAS:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(names.queue(NOTIFIER_QUEUE, replica))
    finally:
        await connection.close()


REPLICAS: set[str] = set()


def replica(name: str) -> str:
    """A replica id used by a test, remembered so that its queue is deleted at the end."""
    REPLICAS.add(name)
    return name


class Feed:
    """Jobs in MongoDB, and their events published on the broker as the gateway would."""

    def __init__(self, broker: Broker, database: Any) -> None:
        self.broker = broker
        self.database = database

    async def key(self, owner: str) -> str:
        return await ApiKeys(self.database).create(owner)

    async def job(self, owner: str, callback_url: str | None = None, status: str = "processing") -> str:
        job_id = uuid.uuid4().hex
        now = datetime.now(UTC)
        await self.database["jobs"].insert_one(
            {
                "_id": job_id,
                "owner": owner,
                "status": status,
                "stages": {
                    name: {"status": "running", "percent": 10.0} for name in ("ingest", "separation", "analysis")
                },
                "progress": 10.0,
                "options": {"stems": 4, "callback_url": callback_url},
                "error": None,
                "created_at": now,
                "updated_at": now,
            }
        )
        return job_id

    async def progress(self, owner: str, job_id: str, overall: float) -> Event[Any]:
        stage = StageProgress(status="running", percent=overall)
        data = JobProgressed(
            job_id=job_id,
            owner=owner,
            status="processing",
            progress=Progress(overall=overall, ingest=stage, separation=stage, analysis=stage),
        )
        return await self._publish(make_event(JOB_PROGRESS, data, source="/stemflow/gateway"))

    async def completed(self, owner: str, job_id: str, beats: int = 0) -> Event[Any]:
        """A completion; with `beats`, an analysis that makes the event about 8 bytes a beat larger."""
        analysis = AnalysisResult(
            tempo_bpm=120.0,
            tempo_confidence=0.9,
            key="A minor",
            key_confidence=0.8,
            loudness_lufs=-14.0,
            true_peak_dbfs=-1.0,
            rms_dbfs=-18.0,
            duration_s=beats * 0.5,
            beat_count=beats,
            beats=[round(i * 0.4993, 3) for i in range(beats)],
        )
        data = JobCompleted(job_id=job_id, owner=owner, analysis=analysis if beats else None)
        return await self._publish(make_event(JOB_COMPLETED, data, source="/stemflow/gateway"))

    async def failed(self, owner: str, job_id: str) -> Event[Any]:
        data = JobFailed(job_id=job_id, owner=owner, error=ErrorInfo(code="separation_failed", message="boom"))
        return await self._publish(make_event(JOB_FAILED, data, source="/stemflow/gateway"))

    async def cancelled(self, owner: str, job_id: str) -> Event[Any]:
        data = JobCancelled(job_id=job_id, owner=owner)
        return await self._publish(make_event(JOB_CANCELLED, data, source="/stemflow/gateway"))

    async def _publish(self, event: Event[Any]) -> Event[Any]:
        await self.broker.publish(event)
        return event


@pytest_asyncio.fixture(scope="session")
async def feed(broker: Broker, mongo_db: Any) -> Feed:
    return Feed(broker, mongo_db)


def connect(url: str, key: str | None, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return websockets.connect(url, additional_headers=headers, open_timeout=TIMEOUT_S, **kwargs)


async def receive(ws: ClientConnection, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def events_until(ws: ClientConnection, last_id: str, frames: list[dict[str, Any]] | None = None) -> list[dict]:
    """Events of batch frames up to and including the event `last_id` (other frames are collected in `frames`)."""
    events: list[dict[str, Any]] = []
    while not events or events[-1]["id"] != last_id:
        frame = await receive(ws)
        if frames is not None:
            frames.append(frame)
        events.extend(frame.get("events", []))
    return events


async def subscribe(ws: ClientConnection, **message: Any) -> dict[str, Any]:
    """Send a subscribe message and return the `subscribed` (or `error`) answer."""
    await ws.send(json.dumps({"type": "subscribe", **message}))
    return await receive(ws)


@pytest.fixture(scope="session")
def kit() -> Any:
    """Test helpers, handed out as a fixture (test modules cannot import conftest)."""
    return types.SimpleNamespace(
        running_notifier=running_notifier,
        replica=replica,
        connect=connect,
        receive=receive,
        events_until=events_until,
        subscribe=subscribe,
        webhook_secret=WEBHOOK_SECRET,
    )
