"""An accepted job is never lost between the MongoDB write and the broker publish.

A gateway accepts jobs while its relay is held back (`STEMFLOW_TEST_OUTBOX_RELAY_DELAY_S`, a
test/ops knob), so every job is in MongoDB with its `job.submitted` still in the
outbox and nothing on the broker; it is then killed with SIGKILL. A restarted
gateway's outbox sweeper publishes them, and ingest's queue on the real broker
holds each job's `job.submitted` exactly once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
import pytest_asyncio
from pymongo import AsyncMongoClient

from stemflow_dev.fixtures import announce_models, delete_namespace, delete_namespace_keys
from stemflow_dev.procs import ProcessGroup
from stemflow_dev.services import Ports, service_env, service_specs
from stemflow_dev.stack import StackUrls
from stemflow_shared.auth import ApiKeys
from stemflow_shared.topology import INGEST_QUEUE, Names

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "integration" / "gateway-crash"
JOBS = 6
HELD_BACK = {"STEMFLOW_TEST_OUTBOX_RELAY_DELAY_S": "3600", "OUTBOX_GRACE_S": "3600"}
RELAYING = {"STEMFLOW_TEST_OUTBOX_RELAY_DELAY_S": "0", "OUTBOX_GRACE_S": "0", "OUTBOX_SWEEP_INTERVAL_S": "0.2"}


class Gateway:
    """One gateway process in its own namespace, database and blob directory."""

    def __init__(self, stack: StackUrls, tmp_path: Path) -> None:
        self.namespace = f"crash{uuid.uuid4().hex[:8]}"
        self.database = f"stemflow_{self.namespace}"
        self.ports = Ports.free()
        self.env = service_env(
            stack,
            namespace=self.namespace,
            mongodb_db=self.database,
            blob_dir=tmp_path / "blobs",
            model_repo=tmp_path,
            ports=self.ports,
        )
        self.group = ProcessGroup()
        self.url = f"http://127.0.0.1:{self.ports.gateway}"

    def start(self, settings: dict[str, str]) -> None:
        spec = next(s for s in service_specs({**self.env, **settings}, self.ports) if s.name == "gateway")
        self.group.start([spec], ARTIFACTS)
        self.group.wait_ready(timeout=120)


@pytest_asyncio.fixture
async def gateway(stack: StackUrls, tmp_path: Path, redis_client: Any) -> AsyncIterator[Gateway]:
    gw = Gateway(stack, tmp_path)
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(stack.mongodb_url)
    await announce_models(redis_client, gw.namespace)  # no separator runs here
    try:
        yield gw
    finally:
        gw.group.stop()
        await mongo.drop_database(gw.database)
        await mongo.close()
        await delete_namespace(stack.amqp_url, gw.namespace)
        await delete_namespace_keys(redis_client, gw.namespace)


async def ingest_queue_messages(amqp_url: str, namespace: str, take: bool = False) -> list[dict[str, Any]]:
    """What waits in ingest's queue: its message count, or (take=True) the events themselves."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(Names(namespace).queue(INGEST_QUEUE), passive=True)
        count = queue.declaration_result.message_count
        if not take:
            return [{}] * count
        events = []
        for _ in range(count):
            message = await queue.get(no_ack=True)
            events.append(json.loads(message.body))
        return events
    finally:
        await connection.close()


async def wait_until_relayed(jobs: Any, stream: Any, job_ids: list[str], timeout_s: float) -> None:
    """Return once no job has an event left in its outbox; re-checks on each change MongoDB reports."""

    async def drained() -> None:
        while await jobs.count_documents({"_id": {"$in": job_ids}, "outbox_at": {"$exists": True}}):
            await stream.next()

    await asyncio.wait_for(drained(), timeout_s)


async def test_jobs_accepted_before_a_crash_are_published_exactly_once(stack: StackUrls, gateway: Gateway) -> None:
    await asyncio.to_thread(gateway.start, HELD_BACK)
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(stack.mongodb_url, tz_aware=True)
    jobs = mongo[gateway.database]["jobs"]
    try:
        key = await ApiKeys(mongo[gateway.database]).create("crash")
        async with httpx.AsyncClient(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}) as http:
            accepted = [
                await http.post("/v1/jobs", json={"source_url": f"https://example.com/{i}.mp3"}) for i in range(JOBS)
            ]
        assert [r.status_code for r in accepted] == [202] * JOBS
        job_ids = [r.json()["id"] for r in accepted]

        # The window: every job is durable in MongoDB with its event pending, and nothing is on the broker.
        pending = await jobs.count_documents({"_id": {"$in": job_ids}, "outbox.name": "job.submitted"})
        assert pending == JOBS
        assert await ingest_queue_messages(stack.amqp_url, gateway.namespace) == []

        gateway.group.kill("gateway")
        assert await ingest_queue_messages(stack.amqp_url, gateway.namespace) == []

        async with await jobs.watch() as stream:
            await asyncio.to_thread(gateway.start, RELAYING)
            await wait_until_relayed(jobs, stream, job_ids, timeout_s=60)

        # Every publish was confirmed before its outbox entry was removed, so the queue now holds them all.
        events = await ingest_queue_messages(stack.amqp_url, gateway.namespace, take=True)
        assert Counter(e["subject"] for e in events) == Counter(job_ids)
        assert {e["type"] for e in events} == {"stemflow.job.submitted.v1"}
        assert await jobs.count_documents({"_id": {"$in": job_ids}, "status": "queued"}) == JOBS
    finally:
        await mongo.close()
