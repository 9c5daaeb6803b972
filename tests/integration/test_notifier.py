"""Two notifier processes on the real RabbitMQ and Redis, asking a gateway process (MongoDB) for keys and job
state: both deliver, a crashed one is resumed from, and a webhook is sent once whatever the number of replicas.

The notifiers and their gateway run in a namespace and a database of their own, with job events published
straight onto the broker; the notifiers get no MongoDB settings.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import aio_pika
import pytest
import pytest_asyncio
import uvicorn
import websockets
from websockets.exceptions import ConnectionClosed

from gateway import lifecycle
from stemflow_dev.fixtures import delete_namespace, delete_namespace_keys
from stemflow_dev.procs import ProcessGroup, ServiceSpec
from stemflow_shared.auth import ApiKeys
from stemflow_shared.events import (
    JOB_COMPLETED,
    JOB_PROGRESS,
    InputRef,
    JobCompleted,
    JobOptions,
    JobProgressed,
    Progress,
    make_event,
)
from stemflow_shared.messaging import Broker
from stemflow_shared.topology import NOTIFIER_QUEUE, Names

from .conftest import ARTIFACTS

pytestmark = pytest.mark.integration
SECRET = "integration-webhook-secret"
INTERNAL_TOKEN = "integration-internal-token"
REPLICAS = ("a", "b")
TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def notifiers(base_env: dict[str, str], isolation: Any) -> Iterator[tuple[ProcessGroup, dict[str, str], dict]]:
    """Replicas a and b and the gateway they ask, as processes; returns the group, the notifiers' environment
    and their WebSocket URLs."""
    namespace, internal_port = f"{isolation.namespace}-ni", _free_port()
    gateway_env = {
        **base_env,
        "STEMFLOW_NAMESPACE": namespace,
        "MONGODB_DB": f"{base_env['MONGODB_DB']}_ni",
        "HTTP_PORT": str(_free_port()),
        "METRICS_PORT": str(_free_port()),
        "INTERNAL_PORT": str(internal_port),
        "INTERNAL_TOKEN": INTERNAL_TOKEN,
        "PYTHONUNBUFFERED": "1",
    }
    env = {
        **{k: v for k, v in base_env.items() if not k.startswith("MONGODB")},
        "STEMFLOW_NAMESPACE": namespace,
        "GATEWAY_INTERNAL_URL": f"http://127.0.0.1:{internal_port}",
        "INTERNAL_TOKEN": INTERNAL_TOKEN,
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_BACKOFF_S": "0.05",
        "PYTHONUNBUFFERED": "1",
    }
    ports = {replica: _free_port() for replica in REPLICAS}
    gateway = ServiceSpec(
        name="gateway-ni",
        argv=[sys.executable, "-m", "gateway.main"],
        env=gateway_env,
        ready_url=f"http://127.0.0.1:{gateway_env['HTTP_PORT']}/readyz",
    )
    specs = [
        gateway,
        *(
            ServiceSpec(
                name=f"notifier-{replica}",
                argv=[sys.executable, "-m", "notifier.main"],
                env={**env, "HTTP_PORT": str(port), "REPLICA_ID": f"it-{replica}"},
                ready_url=f"http://127.0.0.1:{port}/readyz",
            )
            for replica, port in ports.items()
        ),
    ]
    group = ProcessGroup()
    group.start(specs, ARTIFACTS / "notifier")
    try:
        group.wait_ready(timeout=120)
        yield group, env, {replica: f"ws://127.0.0.1:{port}/v1/ws" for replica, port in ports.items()}
    finally:
        group.stop()


@pytest_asyncio.fixture(scope="module")
async def gateway_db(notifiers: Any, mongo_db: Any, base_env: dict[str, str]) -> AsyncIterator[Any]:
    """The database of the notifiers' gateway (dropped at the end)."""
    database = mongo_db.client[f"{base_env['MONGODB_DB']}_ni"]
    yield database
    await mongo_db.client.drop_database(database.name)


@pytest_asyncio.fixture(scope="module")
async def broker(notifiers: Any, redis_client: Any) -> AsyncIterator[Broker]:
    group, env, _ = notifiers
    names = Names(env["STEMFLOW_NAMESPACE"])
    publisher = await Broker(env["AMQP_URL"], names, "notifier-integration").connect()
    try:
        yield publisher
    finally:
        await publisher.close()
        await asyncio.to_thread(group.stop)  # before their queues go
        connection = await aio_pika.connect(env["AMQP_URL"])
        async with connection:
            for replica in REPLICAS:
                channel = await connection.channel()
                await channel.queue_delete(names.queue(NOTIFIER_QUEUE, f"it-{replica}"))
        await delete_namespace(env["AMQP_URL"], env["STEMFLOW_NAMESPACE"])
        await delete_namespace_keys(redis_client, env["STEMFLOW_NAMESPACE"])


async def new_job(gateway_db: Any, owner: str, callback_url: str | None = None) -> str:
    """A job as the gateway stores it (its own lifecycle.new_job), without publishing anything."""
    job_id = lifecycle.new_job_id()
    source = InputRef(source_url="https://songs.example.com/song.wav").model_dump(exclude_none=True)
    options = JobOptions(callback_url=callback_url)
    doc = lifecycle.new_job(job_id, owner, options, source, now=lifecycle.utcnow(), retention=timedelta(days=1))
    await gateway_db["jobs"].insert_one(doc)
    return job_id


async def progress(broker: Broker, owner: str, job_id: str, percent: float) -> str:
    data = JobProgressed(job_id=job_id, owner=owner, status="processing", progress=Progress(overall=percent))
    event = make_event(JOB_PROGRESS, data, source="/stemflow/gateway")
    await broker.publish(event)
    return event.id


async def completed(broker: Broker, owner: str, job_id: str) -> str:
    event = make_event(JOB_COMPLETED, JobCompleted(job_id=job_id, owner=owner), source="/stemflow/gateway")
    await broker.publish(event)
    return event.id


def connect(url: str, key: str) -> Any:
    return websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=TIMEOUT_S)


async def send(ws: Any, **message: Any) -> dict[str, Any]:
    await ws.send(json.dumps(message))
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))


async def event_ids_until(ws: Any, last_id: str) -> list[str]:
    ids: list[str] = []
    while not ids or ids[-1] != last_id:
        frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
        ids.extend(e["id"] for e in frame.get("events", []))
    return ids


async def test_both_replicas_deliver_and_a_crashed_one_is_resumed_from_elsewhere(
    notifiers: Any, broker: Broker, gateway_db: Any
) -> None:
    group, _, urls = notifiers
    key = await ApiKeys(gateway_db).create("replicated")
    job = await new_job(gateway_db, "replicated")
    async with connect(urls["a"], key) as on_a, connect(urls["b"], key) as on_b:
        assert (await send(on_a, type="subscribe", job_id=job))["type"] == "subscribed"
        assert (await send(on_b, type="subscribe"))["type"] == "subscribed"
        first = await progress(broker, "replicated", job, 10.0)
        assert await event_ids_until(on_a, first) == [first]
        assert await event_ids_until(on_b, first) == [first]
        await asyncio.to_thread(group.kill, "notifier-a")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(on_a.recv(), TIMEOUT_S)
        missed = [await progress(broker, "replicated", job, 50.0), await completed(broker, "replicated", job)]
        assert await event_ids_until(on_b, missed[-1]) == missed
    async with connect(urls["b"], key) as back:
        reply = await send(back, type="subscribe", job_id=job, last_event_id=first)
        assert reply["resumed"] is True and reply["state"]["id"] == job
        assert await event_ids_until(back, missed[-1]) == missed
    # Replica a comes back, works through what its queue kept, and serves the same resume.
    await asyncio.to_thread(group.restart, "notifier-a")
    await asyncio.to_thread(group.wait_ready, 60)
    async with connect(urls["a"], key) as again:
        await send(again, type="subscribe", job_id=job, last_event_id=first)
        assert await event_ids_until(again, missed[-1]) == missed


class Receiver:
    """A webhook endpoint that records requests and answers 503 to the first two."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self._arrived = asyncio.Condition()

    async def wait_for(self, event_id: str, count: int) -> None:
        def enough() -> bool:
            return sum(h["stemflow-event-id"] == event_id for h, _ in self.requests) >= count

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(enough), TIMEOUT_S)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status = 503 if len(self.requests) < 2 else 200
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        async with self._arrived:
            self.requests.append(({k.decode(): v.decode() for k, v in scope["headers"]}, body))
            self._arrived.notify_all()


async def test_a_webhook_is_sent_once_by_the_replicas_signed_and_retried(
    notifiers: Any, broker: Broker, gateway_db: Any
) -> None:
    receiver = Receiver()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(uvicorn.Config(receiver, log_config=None, lifespan="off", access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        job = await new_job(gateway_db, "hooked", callback_url=f"http://127.0.0.1:{sock.getsockname()[1]}/hook")
        event_id = await completed(broker, "hooked", job)
        await receiver.wait_for(event_id, 3)
        # Delivered on the third attempt; by the time a later webhook arrives, no replica sent it again.
        sentinel_job = await new_job(gateway_db, "hooked", callback_url=f"http://127.0.0.1:{sock.getsockname()[1]}/s")
        await receiver.wait_for(await completed(broker, "hooked", sentinel_job), 1)
    finally:
        server.should_exit = True
        await serving
    attempts = [(h, b) for h, b in receiver.requests if h["stemflow-event-id"] == event_id]
    assert [h["stemflow-attempt"] for h, _ in attempts] == ["1", "2", "3"]
    for headers, body in attempts:
        fields = dict(part.split("=", 1) for part in headers["stemflow-signature"].split(","))
        digest = hmac.new(SECRET.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(fields["v1"], digest)
        assert json.loads(body)["id"] == event_id
