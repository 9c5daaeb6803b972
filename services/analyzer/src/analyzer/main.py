"""Composition root of the analyzer: warm worker processes first, then the queue."""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import redis.asyncio as redis

from stemflow_shared import telemetry
from stemflow_shared.idempotency import DoneMarks
from stemflow_shared.runtime import connect_broker, open_blob_store, serve_worker
from stemflow_shared.topology import ANALYZER_QUEUE, MIXER_QUEUE

from .handlers import Analyzer, start_worker
from .mixer import Mixer, ProgressRelay, start_mix_worker
from .settings import Settings


async def run(settings: Settings) -> None:
    # spawn: forked children would inherit the event loop and the broker's sockets.
    context = multiprocessing.get_context("spawn")
    # The workers' practice mixes report their progress on one queue, read by a thread of this process.
    relay = ProgressRelay(context.Queue())
    pool = ProcessPoolExecutor(
        max_workers=settings.workers,
        mp_context=context,
        initializer=start_mix_worker,
        initargs=(relay.queue, start_worker),
    )
    # Start and warm every worker before taking messages, so no job pays the compilation.
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(pool, _ping) for _ in range(settings.workers)))
    blobs, close_blobs = open_blob_store(settings)
    redis_client = redis.from_url(settings.redis_url)
    broker = await connect_broker(settings, "analyzer", prefetch=settings.prefetch or settings.workers)
    done_marks = DoneMarks(redis_client, settings.redis_prefix)
    await broker.consume(
        ANALYZER_QUEUE, Analyzer(pool, blobs, redis_client, settings).handlers(), done_marks=done_marks
    )
    await broker.consume(MIXER_QUEUE, Mixer(pool, blobs, broker, relay=relay).handlers(), done_marks=done_marks)

    async def close_pool() -> None:
        await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)
        await asyncio.to_thread(relay.close)

    await serve_worker(
        settings,
        "analyzer",
        broker,
        {"redis": redis_client.ping, "blobs": blobs.ping},
        [("redis", redis_client.aclose), ("blobs", close_blobs), ("workers", close_pool)],
    )


def _ping() -> bool:
    return True


def main() -> None:
    settings = Settings()
    telemetry.setup_logging("analyzer", settings.log_level, settings.log_format)
    telemetry.setup_tracing("analyzer")
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
