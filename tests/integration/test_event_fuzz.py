"""Random and mutated envelopes thrown at every service's queue: no crash, nothing stuck, bad ones dead-lettered."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest

from stemflow_dev.fixtures import Isolation
from stemflow_dev.stack import StackUrls
from stemflow_shared.events import (
    ANALYSIS_COMPLETED,
    AUDIO_INGESTED,
    JOB_COMPLETED,
    JOB_SUBMITTED,
    SEPARATION_PROGRESS,
)
from stemflow_shared.topology import REASON_HEADER, SHARED_QUEUES, Names

pytestmark = pytest.mark.integration
SEED = 20261122
COUNT = 120

VALID = {
    JOB_SUBMITTED: {"job_id": "fuzz", "owner": "o", "input": {"blob_key": "jobs/fuzz/upload"}},
    AUDIO_INGESTED: {
        "job_id": "fuzz",
        "owner": "o",
        "options": {},
        "audio": {
            "blob_key": "jobs/fuzz/audio.wav",
            "duration_s": 1,
            "sample_rate": 44100,
            "channels": 2,
            "frames": 44100,
            "fingerprint": "f",
        },
        "source": {"format": "WAV", "sample_rate": 44100, "channels": 2, "duration_s": 1},
    },
    SEPARATION_PROGRESS: {"job_id": "fuzz", "percent": 50},
    ANALYSIS_COMPLETED: {"job_id": "fuzz", "analysis": {}},
    JOB_COMPLETED: {"job_id": "fuzz", "owner": "o"},
}
JUNK: list[Any] = [
    None,
    -1,
    1e308,
    "",
    "x" * 70_000,
    "../../etc/passwd",
    "\u0000\ud7ff\U0001f3b5",
    [],
    {},
    [1, [2]],
    True,
    {"$where": "1"},
]


def mutations(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """(routing key, body) pairs: valid shapes with one thing broken, and plain garbage."""
    specs = list(VALID)
    for i in range(COUNT):
        spec = rng.choice(specs)
        envelope: dict[str, Any] = {
            "specversion": "1.0",
            "id": f"fuzz-{i}",
            "source": "/fuzz",
            "type": spec.type,
            "subject": "fuzz",
            "data": json.loads(json.dumps(VALID[spec])),
        }
        kind = i % 6
        if kind == 0:
            yield spec.routing_key, rng.randbytes(rng.randint(0, 300))
            continue
        if kind == 1:
            del envelope[rng.choice(["specversion", "id", "source", "type", "data"])]
        elif kind == 2:
            envelope[rng.choice(list(envelope))] = rng.choice(JUNK)
        elif kind == 3:
            data = envelope["data"]
            data[rng.choice(list(data))] = rng.choice(JUNK)
        elif kind == 4:
            envelope["type"] = rng.choice(["stemflow.job.submitted.v2", "org.other.event", spec.type.upper()])
        else:
            envelope["data"]["job_id"] = rng.choice(["no-such-job", "a" * 64, "x/../y"])
        yield spec.routing_key, json.dumps(envelope).encode()


async def test_fuzzed_events_never_crash_a_service_and_every_queue_drains(
    system: Any, stack: StackUrls, isolation: Isolation
) -> None:
    names = Names(isolation.namespace)
    rng = random.Random(SEED)
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(names.exchange)
        for sent, (routing_key, body) in enumerate(mutations(rng)):
            await exchange.publish(aio_pika.Message(body, message_id=f"fuzz-{sent}"), routing_key)

        depths: dict[str, int] = {}

        async def drained() -> None:
            while True:
                for spec in SHARED_QUEUES:
                    declared = await channel.declare_queue(names.queue(spec), passive=True)
                    # Queues of models this system does not serve have no consumer; nothing fuzzed goes there.
                    if declared.declaration_result.consumer_count:
                        depths[spec.name] = declared.declaration_result.message_count
                if not any(depths.values()):
                    return
                await asyncio.sleep(0.2)  # queue depth can only be observed by asking again

        try:
            await asyncio.wait_for(drained(), 120)
        except TimeoutError:
            pytest.fail(f"queues did not drain: {depths}")
        assert {"ingest", "separator.htdemucs", "analyzer", "gateway"} <= set(depths)
        dead = await channel.declare_queue(names.dead_letter_queue, passive=True)
        assert dead.declaration_result.message_count > 0
        sample = await dead.get(no_ack=False)
        assert sample is not None and sample.headers.get(REASON_HEADER)
        await sample.nack(requeue=True)
    for name in ("gateway", "notifier", "ingest", "separator", "analyzer"):
        assert system.processes.is_running(name), f"{name} died under fuzzed events"
