"""Composition root of the separator: the model is loaded once, before the first message."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as redis
import torch

from stemflow_shared import metrics, telemetry
from stemflow_shared.idempotency import DoneMarks
from stemflow_shared.runtime import connect_broker, open_blob_store, serve_worker
from stemflow_shared.separators import Announcement, SeparatorRegistry, ServedModel
from stemflow_shared.topology import PRIORITIES, separator_queue

from .device import make_engine, pick_device
from .engine import BatchReport, SegmentEngine
from .handlers import Separator
from .models import ModelCache, ModelError
from .plan import submodels
from .settings import Settings

log = logging.getLogger(__name__)


def _count_batch(report: BatchReport) -> None:
    """The batch metrics: size, device time, out-of-memory splits, and GPU memory after the batch."""
    device = report.device
    metrics.SEPARATOR_DEVICE_BUSY.labels(device).inc(report.seconds)
    if report.out_of_memory:
        metrics.SEPARATOR_OOM_SPLITS.labels(device).inc()
    else:
        metrics.SEPARATOR_BATCH_SIZE.labels(device).observe(len(report.jobs))
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        metrics.GPU_MEMORY_USED.labels(device).set(torch.cuda.memory_allocated(index))
        metrics.GPU_MEMORY_PEAK.labels(device).set(torch.cuda.max_memory_allocated(index))


async def preload(
    models: ModelCache, engine: SegmentEngine, names: list[str], *, compile_models: bool = False
) -> dict[str, ModelError]:
    """Load (and compile) the served models before the first message; what failed, by name.

    A model that cannot load does not stop the worker: restarting would meet the same error
    forever, while its jobs can fail with the error's code (the cache tries again per job).
    """
    failed: dict[str, ModelError] = {}
    for name in names:
        try:
            loaded = await asyncio.to_thread(models.get, name)
        except ModelError as exc:
            log.error("model %s cannot be served (%s): its jobs will fail with that code", name, exc.code)
            failed[name] = exc
            continue
        if compile_models:
            for model in submodels(loaded.model)[0]:
                await asyncio.to_thread(engine.warm_up, model)
        metrics.MODEL_INFO.labels(name, str(engine.device), engine.precision).set(1)
        if loaded.untrained:
            log.warning("model %s has UNTRAINED weights: stems will be noise-like, for testing only", name)
    return failed


async def announce_served(
    registry: SeparatorRegistry, settings: Settings, models: ModelCache, served: list[str], separator: Separator
) -> None:
    """Tell the gateway, every few seconds, which models this replica serves; the word expires if it stops."""
    served_models = []
    for name in served:
        loaded = await asyncio.to_thread(models.get, name)
        served_models.append(ServedModel(name=name, sources=loaded.sources, untrained=loaded.untrained))
    while True:
        announcement = Announcement(
            replica=settings.replica_id,
            models=served_models,
            device=str(models.device),
            slots=settings.prefetch,
            mean_job_s=separator.mean_job_s,
        )
        try:
            await registry.announce(announcement, ttl_s=3 * settings.announce_interval_s)
        except Exception as exc:  # Redis away: the announcement lapses, and the gateway stops offering the models
            log.warning("could not announce the served models: %s", exc)
        await asyncio.sleep(settings.announce_interval_s)


async def run(settings: Settings) -> None:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = pick_device(settings.device)
    engine = make_engine(settings, device, _count_batch).start()
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device).index or 0).total_memory
        metrics.GPU_MEMORY_TOTAL.labels(device).set(total)
    models = ModelCache(settings.model_repo, device)
    # A compiled or exported network is made (or read from the cache) before the first message.
    warm = settings.torch_compile or engine.backend != "torch"
    failed = await preload(models, engine, settings.model_names, compile_models=warm)
    log.info(
        "separating on %s with %s in %s, up to %d segments per batch",
        device,
        engine.backend,
        engine.precision,
        engine.max_batch,
    )
    blobs, close_blobs = open_blob_store(settings)
    redis_client = redis.from_url(settings.redis_url)
    broker = await connect_broker(settings, "separator")
    separator = Separator(models, engine, blobs, redis_client, broker, settings)
    done = DoneMarks(redis_client, settings.redis_prefix)
    # Only this worker's models reach it (its weights stay warm); high priority has its own lane.
    for name in settings.model_names:
        for priority in PRIORITIES:
            await broker.consume(separator_queue(name, priority), separator.handlers(), done_marks=done)
    registry = SeparatorRegistry(redis_client, settings.redis_prefix)
    served = [name for name in settings.model_names if name not in failed]
    announcing = asyncio.create_task(announce_served(registry, settings, models, served, separator))

    async def withdraw() -> None:
        announcing.cancel()
        await registry.withdraw(settings.replica_id)

    await serve_worker(
        settings,
        "separator",
        broker,
        {"redis": redis_client.ping, "blobs": blobs.ping},
        [
            ("announcement", withdraw),
            ("engine", lambda: asyncio.to_thread(engine.close)),
            ("redis", redis_client.aclose),
            ("blobs", close_blobs),
        ],
    )


def main() -> None:
    settings = Settings()
    telemetry.setup_logging("separator", settings.log_level, settings.log_format)
    telemetry.setup_tracing("separator")
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
