"""A malformed event published straight onto the broker is dead-lettered; the services keep serving."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aio_pika
import pytest
import soundfile as sf

from stemflow_dev import demo_song
from stemflow_dev.client import StemflowClient
from stemflow_dev.fixtures import Isolation
from stemflow_dev.stack import StackUrls
from stemflow_shared.topology import DETAIL_HEADER, QUEUE_HEADER, REASON_HEADER, Names

pytestmark = pytest.mark.integration


async def _dead_letter(amqp_url: str, names: Names, message_id: str, timeout_s: float = 30) -> object:
    """The dead-lettered copy of one message (others are left in the queue)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        queue = await channel.get_queue(names.dead_letter_queue, ensure=False)

        async def find() -> object:
            async with queue.iterator() as messages:
                async for message in messages:
                    if message.message_id == message_id:
                        await message.ack()
                        return message
                    await message.reject(requeue=True)
            raise AssertionError("the dead-letter queue was closed")

        return await asyncio.wait_for(find(), timeout_s)


@pytest.mark.parametrize(
    ("routing_key", "body", "reason"),
    [
        ("job.submitted", b"{this is not json", "malformed_json"),
        (
            "audio.ingested",
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": "x",
                    "source": "/evil",
                    "type": "stemflow.audio.ingested.v1",
                    "data": {"job_id": "j"},
                }
            ).encode(),
            "invalid_data",
        ),
    ],
)
async def test_malformed_events_are_dead_lettered_with_a_reason(
    system: object,
    stack: StackUrls,
    isolation: Isolation,
    client: StemflowClient,
    tmp_path: Path,
    routing_key: str,
    body: bytes,
    reason: str,
) -> None:
    names = Names(isolation.namespace)
    message_id = f"poison-{routing_key}"
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(names.exchange)
        await exchange.publish(aio_pika.Message(body, message_id=message_id), routing_key)
    dead = await _dead_letter(stack.amqp_url, names, message_id)
    assert dead.headers[REASON_HEADER] == reason
    assert dead.headers[DETAIL_HEADER]
    assert dead.headers[QUEUE_HEADER].startswith(isolation.namespace)
    assert dead.body == body

    # The services keep serving: a good job still completes.
    song = tmp_path / "after.wav"
    sf.write(song, demo_song.render(3.0), 44100)
    job = await client.submit(song, stems=2, quality="fast", analyze=False)
    await client.follow(job["id"], timeout_s=120)
    assert (await client.job(job["id"]))["status"] == "completed"
