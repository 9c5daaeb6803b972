"""Faults injected the way they happen in production, for the fault-matrix test and the chaos bench.

Work is published straight onto the queue of the stage under test through the broker's default
exchange, as a real producer of events would: a job another service submits by event (delivered to
the gateway only), a stage's work whose audio is not audio, a stage result that is not a valid event.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika

from stemflow_shared.events import (
    AUDIO_INGESTED,
    JOB_SUBMITTED,
    AudioInfo,
    AudioIngested,
    InputRef,
    JobOptions,
    JobSubmitted,
    make_event,
)
from stemflow_shared.storage import BlobStore, normalised_key
from stemflow_shared.topology import ANALYZER_QUEUE, GATEWAY_QUEUE, Names, routing_headers, separator_queue


@dataclass
class Faults:
    amqp_url: str
    names: Names
    blobs: BlobStore
    owner: str

    async def to_queue(self, queue: str, body: bytes, headers: dict[str, Any] | None = None) -> None:
        """Publish persistently and wait for the broker's confirm, as the services do: a fault injected while
        the broker restarts either raises here or is in the queue."""
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            message = aio_pika.Message(
                body,
                message_id=str(uuid.uuid4()),
                headers=headers or {},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)

    async def adopted_job(self, **options: Any) -> str:
        """A job another service submitted by event, delivered to the gateway only (no ingest runs it)."""
        job_id = f"fm{uuid.uuid4().hex}"
        submitted = JobSubmitted(
            job_id=job_id,
            owner=self.owner,
            options=JobOptions(**options),
            input=InputRef(source_url="https://example.com/song.wav"),
        )
        event = make_event(JOB_SUBMITTED, submitted, source="/other-team")
        await self.to_queue(self.names.queue(GATEWAY_QUEUE), event.envelope.to_json())
        return job_id

    async def garbage_work(self, job_id: str, stage: str, key: str | None = None, **options: Any) -> None:
        """`audio.ingested` to `stage`'s queue whose normalised audio is not audio (or is at `key`)."""
        if key is None:
            key = normalised_key(job_id)

            async def chunks() -> AsyncIterator[bytes]:
                yield b"RIFF\x00\x00\x00\x00WAVEgarbage" * 100

            await self.blobs.put_stream(key, chunks())
        ingested = AudioIngested(
            job_id=job_id,
            owner=self.owner,
            options=JobOptions(**options),
            audio=AudioInfo(blob_key=key, duration_s=3, sample_rate=44100, channels=2, frames=132300, fingerprint="x"),
            source={"format": "WAV", "sample_rate": 44100, "channels": 2, "duration_s": 3},
        )
        event = make_event(AUDIO_INGESTED, ingested, source="/stemflow/ingest")
        queue = ANALYZER_QUEUE if stage == "analysis" else separator_queue(ingested.options.model)
        await self.to_queue(self.names.queue(queue), event.envelope.to_json(), routing_headers(event))

    async def invalid_result(self, job_id: str) -> None:
        """An `analysis.completed` for the job whose data does not validate, to the gateway's queue."""
        body = {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": "/stemflow/analyzer",
            "type": "stemflow.analysis.completed.v1",
            "subject": job_id,
            "data": {"job_id": job_id, "analysis": {"tempo_bpm": None, "key": "C major"}},
        }
        await self.to_queue(self.names.queue(GATEWAY_QUEUE), json.dumps(body).encode())

    # The poisons as the matrix names them: inject, and the code the job must end with.
    async def analysis_cannot_read_its_audio(self) -> str:
        job_id = await self.adopted_job(separate=False)
        await self.garbage_work(job_id, "analysis", separate=False)
        return job_id

    async def separation_cannot_read_its_audio(self) -> str:
        job_id = await self.adopted_job(analyze=False, stems=2)
        await self.garbage_work(job_id, "separation", analyze=False, stems=2)
        return job_id

    async def separation_fails_on_every_delivery(self) -> str:
        """Work naming audio outside the blob store (a broken or hostile producer): the handler raises."""
        job_id = await self.adopted_job(analyze=False, stems=2)
        await self.garbage_work(job_id, "separation", key="../outside/audio.wav", analyze=False, stems=2)
        return job_id

    async def invalid_stage_result(self) -> str:
        job_id = await self.adopted_job(separate=False)
        await self.invalid_result(job_id)
        return job_id

    async def model_nobody_serves_by_event(self) -> str:
        return await self.adopted_job(model="htdemucs_6s", stems=6)


POISONS: dict[str, str] = {
    # The workers report unreadable audio themselves; a handler that raises on every delivery is dead-lettered.
    "analysis_cannot_read_its_audio": "analysis_error",
    "separation_cannot_read_its_audio": "invalid_audio",
    "separation_fails_on_every_delivery": "separation_handler_error",
    "invalid_stage_result": "analysis_invalid_event",
    "model_nobody_serves_by_event": "model_unavailable",
}
