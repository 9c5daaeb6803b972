"""The notifier in-process (uvicorn on a loopback port) on the real RabbitMQ and Redis of the test run, asking a
real gateway (in-process too, on MongoDB) for API keys and job state through its internal API.

The notifier tests use a namespace and a database of their own, so the services of the integration
system (another namespace, another database) never take their webhooks, events or jobs. The notifier
itself gets no MongoDB settings: the gateway owns the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
import websockets
from websockets.asyncio.client import ClientConnection

from gateway import lifecycle
from gateway.main import create_app as create_gateway
from gateway.settings import Settings as GatewaySettings
from notifier.main import create_app, server_config
from notifier.settings import Settings
from stemflow_dev.fixtures import delete_namespace, delete_namespace_keys
from stemflow_dev.stack import StackUrls
from stemflow_shared.events import (
    JOB_CANCELLED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_PROGRESS,
    AnalysisResult,
    ErrorInfo,
    Event,
    InputRef,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobOptions,
    JobProgressed,
    Progress,
    StageProgress,
    make_event,
)
from stemflow_shared.messaging import Broker
from stemflow_shared.topology import NOTIFIER_QUEUE, Names

WEBHOOK_SECRET = "test-webhook-secret"
INTERNAL_TOKEN = "notifier-tests-internal-token"
TIMEOUT_S = 20.0
# The gateway owns these; the notifier must work without them.
MONGODB_SETTINGS = ("MONGODB_URL", "MONGODB_DB")


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
    env: dict[str, str], send_buffer: int | None = None, ready: bool = True, **overrides: Any
) -> AsyncIterator[Running]:
    """A notifier serving on a free port, returned once its lifespan has started (consumers bound) and, unless
    `ready` is False, once /readyz says it is ready.

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
            probe = asyncio.create_task(http.get(f"{running.http_url}/readyz"))
            await asyncio.wait({probe, task}, timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            if not probe.done() or probe.result().status_code != (200 if ready else 503):
                probe.cancel()
                raise RuntimeError("the notifier did not start")
        yield running
    finally:
        if not task.done():
            await running.stop()


@dataclass
class RunningGateway:
    """The gateway app serving in this process, and the URL of its internal API."""

    app: Any
    internal_url: str

    @property
    def state(self) -> Any:
        return self.app.state


@pytest_asyncio.fixture(scope="session")
async def gateway(
    base_env: dict[str, str], isolation: Any, stack: StackUrls, redis_client: Any
) -> AsyncIterator[RunningGateway]:
    """The real gateway app, serving its internal API on a free port, in the notifier tests' namespace and a
    database of their own (dropped at the end)."""
    from pymongo import AsyncMongoClient

    env = {k.lower(): v for k, v in base_env.items()}
    database = f"{base_env['MONGODB_DB']}_nt"
    settings = GatewaySettings(
        **{
            **env,
            "stemflow_namespace": f"{isolation.namespace}-nt",
            "mongodb_db": database,
            "internal_token": INTERNAL_TOKEN,
            "internal_port": 0,
            "metrics_port": 0,
        }
    )
    app = create_gateway(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while not server.started:
                await asyncio.wait({task}, timeout=0.05)  # returns at once if the gateway failed to start
                assert not task.done(), "the gateway did not start"
        yield RunningGateway(app, f"http://127.0.0.1:{_internal_port(app)}")
    finally:
        server.should_exit = True
        await task
        mongo: AsyncMongoClient[Any] = AsyncMongoClient(stack.mongodb_url)
        await mongo.drop_database(database)
        await mongo.close()


def _internal_port(app: Any) -> int:
    """The port the gateway's InternalPort middleware bound."""
    layer = app.middleware_stack
    while type(layer).__name__ != "InternalPort":
        layer = layer.app
    return int(layer.bound_port)


@pytest_asyncio.fixture(scope="session")
async def notifier_env(
    base_env: dict[str, str], isolation: Any, redis_client: Any, gateway: Any
) -> AsyncIterator[dict[str, str]]:
    """The notifier tests' environment (no MongoDB settings); their Redis keys are removed at the end."""
    namespace = f"{isolation.namespace}-nt"
    yield {
        **{k: v for k, v in base_env.items() if k not in MONGODB_SETTINGS},
        "GATEWAY_INTERNAL_URL": gateway.internal_url,
        "INTERNAL_TOKEN": INTERNAL_TOKEN,
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
    """Keys and jobs kept by the real gateway, and job events published on the broker as the gateway would."""

    def __init__(self, broker: Broker, gateway: Any) -> None:
        self.broker = broker
        self.gateway = gateway

    async def key(self, owner: str) -> str:
        return await self.gateway.state.api_keys.create(owner)

    async def revoke(self, key: str) -> None:
        await self.gateway.state.api_keys.revoke(key)

    async def job(self, owner: str, callback_url: str | None = None, status: str = "processing") -> str:
        """A job document made by the gateway's own code, then set to `status` with every stage at 10%."""
        job_id = lifecycle.new_job_id()
        options = JobOptions(stems=4, callback_url=callback_url)
        source = InputRef(source_url="https://songs.example.com/song.wav")
        doc = lifecycle.new_job(
            job_id,
            owner,
            options,
            source.model_dump(exclude_none=True),
            now=lifecycle.utcnow(),
            retention=timedelta(days=1),
        )
        repo = self.gateway.state.jobs.repo
        await repo.insert(doc, [])
        running = {
            f"stages.{name}": {"status": "running", "percent": 10.0} for name in ("ingest", "separation", "analysis")
        }
        await repo.jobs.update_one({"_id": job_id}, {"$set": {"status": status, "progress": 10.0, **running}})
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
async def feed(broker: Broker, gateway: Any) -> Feed:
    return Feed(broker, gateway)


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
