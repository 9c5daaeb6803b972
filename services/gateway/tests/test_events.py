"""Stage events from the real broker move the job, and the gateway publishes what they cause."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import httpx
import pytest_asyncio

from stemflow_shared.events import (
    AUDIO_INGESTED,
    AudioInfo,
    AudioIngested,
    JobOptions,
    SourceInfo,
    make_event,
)
from stemflow_shared.messaging import Broker
from stemflow_shared.topology import Names


class JobEvents:
    """A queue of our own bound to every `job.*` event of the namespace; waits for one that matches."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with self._changed:
            self.seen.append(json.loads(message.body))
            self._changed.notify_all()

    async def wait_for(self, match: Any, timeout_s: float = 30) -> dict[str, Any]:
        async def first() -> dict[str, Any]:
            async with self._changed:
                await self._changed.wait_for(lambda: any(match(e) for e in self.seen))
                return next(e for e in self.seen if match(e))

        return await asyncio.wait_for(first(), timeout_s)


@pytest_asyncio.fixture(scope="module")
async def job_events(base_env: dict[str, str], app: Any) -> AsyncIterator[JobEvents]:
    names = Names(base_env["STEMFLOW_NAMESPACE"])
    connection = await aio_pika.connect(base_env["AMQP_URL"])
    events = JobEvents()
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(names.exchange)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "job.*")
        await queue.consume(events.on_message, no_ack=True)
        yield events
    finally:
        await connection.close()


@pytest_asyncio.fixture(scope="module")
async def ingest(base_env: dict[str, str], app: Any) -> AsyncIterator[Broker]:
    """A publisher standing in for the ingest service."""
    broker = Broker(base_env["AMQP_URL"], Names(base_env["STEMFLOW_NAMESPACE"]), "ingest")
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


async def test_an_ingested_event_moves_the_job_and_is_announced(
    app: Any, client: httpx.AsyncClient, helpers: Any, job_events: JobEvents, ingest: Broker
) -> None:
    alice = await helpers.new_key(app, "events")
    job = (await helpers.submit(client, alice)).json()
    submitted = await job_events.wait_for(lambda e: e["subject"] == job["id"])
    assert submitted["type"] == "stemflow.job.submitted.v1"

    ingested = AudioIngested(
        job_id=job["id"],
        owner="events",
        options=JobOptions(),
        audio=AudioInfo(blob_key="a", duration_s=3, sample_rate=44100, channels=2, frames=132300, fingerprint="e1"),
        source=SourceInfo(format="WAV", sample_rate=22050, channels=1, duration_s=3),
    )
    await ingest.publish(make_event(AUDIO_INGESTED, ingested, source="/stemflow/ingest"))

    progress = await job_events.wait_for(
        lambda e: e["subject"] == job["id"] and e["type"] == "stemflow.job.progress.v1"
    )
    assert progress["data"]["status"] == "processing"
    assert progress["data"]["progress"]["ingest"] == {"status": "completed", "percent": 100.0}
    # The cache was updated before the event went out: a read right after it is never stale.
    current = (await client.get(f"/v1/jobs/{job['id']}", headers=alice)).json()
    assert current["status"] == "processing" and current["input"]["duration_s"] == 3


async def test_a_job_that_stops_changing_is_failed_by_the_sweeper_and_announced(
    app: Any, client: httpx.AsyncClient, helpers: Any, job_events: JobEvents
) -> None:
    from datetime import timedelta

    from stemflow_shared import metrics
    from stemflow_shared.cancellation import cancel_flag_key

    alice = await helpers.new_key(app, "stuck")
    stuck = (await helpers.submit(client, alice)).json()
    fresh = (await helpers.submit(client, alice)).json()
    jobs = app.state.jobs
    long_ago = (await jobs.repo.get(stuck["id"]))["updated_at"] - timedelta(hours=2)
    await jobs.repo.jobs.update_one({"_id": stuck["id"]}, {"$set": {"updated_at": long_ago}})
    before = metrics.JOBS_TIMED_OUT.labels("ingest")._value.get()

    await jobs.sample_unfinished()
    assert metrics.JOBS_OLDEST_UNCHANGED.labels("queued")._value.get() >= 7200
    assert metrics.JOBS_ACTIVE.labels("queued")._value.get() >= 2

    assert await jobs.time_out_stuck(3600) >= 1
    failed = await job_events.wait_for(lambda e: e["subject"] == stuck["id"] and e["type"] == "stemflow.job.failed.v1")
    assert failed["data"]["error"]["code"] == "stage_timeout"
    body = (await client.get(f"/v1/jobs/{stuck['id']}", headers=alice)).json()
    assert body["status"] == "failed" and body["error"]["code"] == "stage_timeout"
    assert await app.state.redis.get(cancel_flag_key(app.state.settings.redis_prefix, stuck["id"])) == b"1"
    assert metrics.JOBS_TIMED_OUT.labels("ingest")._value.get() == before + 1
    # A job that changed recently is left alone, and a second sweep finds nothing more to do.
    assert (await client.get(f"/v1/jobs/{fresh['id']}", headers=alice)).json()["status"] == "queued"
    assert await jobs.time_out_stuck(3600) == 0
    await jobs.sample_unfinished()
    assert metrics.JOBS_OLDEST_UNCHANGED.labels("queued")._value.get() < 3600
