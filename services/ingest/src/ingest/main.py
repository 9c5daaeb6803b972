"""Composition root of the ingest service."""

from __future__ import annotations

import asyncio

import httpx
import redis.asyncio as redis

from stemflow_shared import telemetry
from stemflow_shared.idempotency import DoneMarks
from stemflow_shared.reuse import ResultIndex
from stemflow_shared.runtime import connect_broker, open_blob_store, serve_worker
from stemflow_shared.topology import INGEST_QUEUE

from .handlers import Ingest
from .settings import Settings


async def run(settings: Settings) -> None:
    blobs, close_blobs = open_blob_store(settings)
    redis_client = redis.from_url(settings.redis_url)
    http = httpx.AsyncClient(timeout=httpx.Timeout(settings.download_timeout_s, connect=10.0))
    broker = await connect_broker(settings, "ingest")
    results = ResultIndex(redis_client, settings.redis_prefix, 0) if settings.reuse_results else None
    await broker.consume(
        INGEST_QUEUE,
        Ingest(blobs, redis_client, http, settings, results).handlers(),
        done_marks=DoneMarks(redis_client, settings.redis_prefix),
    )
    await serve_worker(
        settings,
        "ingest",
        broker,
        {"redis": redis_client.ping, "blobs": blobs.ping},
        [("fetcher", http.aclose), ("redis", redis_client.aclose), ("blobs", close_blobs)],
    )


def main() -> None:
    settings = Settings()
    telemetry.setup_logging("ingest", settings.log_level, settings.log_format)
    telemetry.setup_tracing("ingest")
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
