"""Composition root of the gateway: settings, telemetry, connections, routes, consumer."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import redis.asyncio as redis
from fastapi import FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from pymongo import AsyncMongoClient

from stemflow_shared import telemetry
from stemflow_shared.auth import ApiKeys
from stemflow_shared.health import health_routes
from stemflow_shared.httpserver import server_options
from stemflow_shared.messaging import Broker, BrokerOptions
from stemflow_shared.mongo import mongodb_ready
from stemflow_shared.reuse import ResultIndex
from stemflow_shared.runtime import tune_gc
from stemflow_shared.separators import SeparatorRegistry
from stemflow_shared.settings import HarnessKnobs
from stemflow_shared.storage import make_blob_store
from stemflow_shared.topology import GATEWAY_QUEUE, Names

from . import batches, downloads, job_routes, mixes, models, problems
from .cache import GZIP_MIN_BYTES, JobCache
from .cached_reads import CachedJobReads
from .deadletters import DeadLetterWatch
from .edge import Edge
from .handlers import handlers
from .http_metrics import MetricsPort, Observe
from .internal import InternalPort
from .jobs import Jobs
from .models import ModelCatalogue
from .mongo_monitoring import SlowCommandLogger
from .outbox import OutboxRelay
from .periodic import every
from .ratelimit import RateLimiter
from .repository import JobRepository
from .settings import Settings
from .web import add_api_docs, add_web_page

log = logging.getLogger(__name__)

# The requests that create jobs: each starts a job's trace, sampled at OTEL_TRACES_SAMPLER_ARG; every other
# request is traced at STEMFLOW_TRACES_REQUEST_RATIO (telemetry.HeadSampling).
JOB_CREATING_ROUTES = (("POST", "/v1/jobs"), ("POST", "/v1/batches"))


def create_app(settings: Settings) -> FastAPI:
    """The gateway application; connections open in its lifespan, not at import."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mongo: AsyncMongoClient[Any] = AsyncMongoClient(
            settings.mongodb_url,
            tz_aware=True,
            maxPoolSize=settings.mongodb_max_pool_size,
            minPoolSize=settings.mongodb_min_pool_size,
            serverSelectionTimeoutMS=5000,
            event_listeners=[SlowCommandLogger(settings.slow_mongodb_command_ms)],
        )
        database = mongo[settings.mongodb_db]
        # Its commands on requests that are not traced skip the Redis instrumentation's wrapper (rate limits,
        # the model list's announcements, the job cache): they would make no span anyway.
        redis_client = telemetry.redis_skipping_suppressed(
            redis.from_url(
                settings.redis_url,
                socket_timeout=2,
                socket_connect_timeout=2,
                max_connections=settings.redis_max_connections,
            )
        )
        broker = Broker(
            settings.amqp_url,
            Names(settings.stemflow_namespace),
            "gateway",
            BrokerOptions(delivery_limit=settings.delivery_limit, prefetch=settings.prefetch),
        )
        await broker.connect()
        repo = JobRepository(database)
        await repo.ensure_indexes()
        blobs = make_blob_store(settings, lambda: database)
        relay = OutboxRelay(repo, broker, delay_s=HarnessKnobs().outbox_relay_delay_s)
        results = (
            ResultIndex(redis_client, settings.redis_prefix, settings.result_reuse_ttl_s)
            if settings.result_reuse_ttl_s
            else None
        )
        jobs = Jobs(
            repo,
            JobCache(
                redis_client,
                settings.redis_prefix,
                settings.job_cache_ttl_s,
                settings.gzip_level,
                pages_per_owner=settings.list_cache_pages,
            ),
            relay,
            blobs,
            redis_client,
            redis_prefix=settings.redis_prefix,
            base_url=settings.public_url,
            events_url=settings.events_url,
            retention=timedelta(hours=settings.job_retention_hours),
            results=results,
            models=ModelCatalogue(SeparatorRegistry(redis_client, settings.redis_prefix), broker),
        )
        app.state.settings = settings
        app.state.jobs = jobs
        app.state.mixes = practice_mixes = mixes.Mixes(jobs)
        app.state.mongo = mongo
        app.state.redis = redis_client
        app.state.api_keys = ApiKeys(database)
        app.state.limiter = RateLimiter(redis_client, settings.redis_prefix, settings.rate_limit_per_minute)
        app.state.checks = {
            "mongodb": lambda: mongodb_ready(database),
            "redis": redis_client.ping,
            "broker": broker.ready,
        }
        await broker.consume(
            GATEWAY_QUEUE, {**handlers(jobs), **practice_mixes.handlers()}, own_events=relay.published_here
        )
        await broker.consume_dead_letters(DeadLetterWatch(jobs, practice_mixes).settle)
        grace = timedelta(seconds=settings.outbox_grace_s)
        background = [
            asyncio.create_task(every(settings.outbox_sweep_interval_s, "outbox sweep", lambda: relay.sweep(grace))),
            asyncio.create_task(every(settings.retention_sweep_interval_s, "retention", jobs.collect_expired)),
            asyncio.create_task(every(settings.job_watch_interval_s, "unfinished jobs", jobs.sample_unfinished)),
        ]
        sweeps = (
            (settings.stuck_job_timeout_s, "stuck jobs failed", jobs.time_out_stuck),
            (settings.stuck_mix_timeout_s, "stuck mixes failed", practice_mixes.time_out_stuck),
        )
        for timeout_s, what, sweep in sweeps:
            if timeout_s:  # 0 = never
                task = every(settings.job_watch_interval_s, what, functools.partial(sweep, timeout_s))
                background.append(asyncio.create_task(task))
        log.info("gateway ready on port %d", settings.http_port)
        try:
            yield
        finally:
            await broker.stop_consuming(settings.shutdown_grace_s)
            for task in background:
                task.cancel()
            await relay.drain(5)
            await broker.close()
            await redis_client.aclose()
            await mongo.close()

    app = FastAPI(
        title="Stemflow",
        version="1.0.0",
        description="Split songs into stems and measure them.",
        lifespan=lifespan,
        telemetry=telemetry.fastapi_telemetry(),
        docs_url=None,  # add_api_docs serves them without a CDN
        redoc_url=None,
    )
    problems.install(app)
    app.include_router(job_routes.router)
    app.include_router(models.router)
    app.include_router(downloads.router)
    app.include_router(batches.router)
    app.include_router(mixes.router)
    add_web_page(app, settings.events_url)
    add_api_docs(app)
    for route in health_routes(lambda request: request.app.state.checks, with_metrics=False):
        app.router.routes.append(route)
    app.add_middleware(GZipMiddleware, minimum_size=GZIP_MIN_BYTES, compresslevel=settings.gzip_level)
    app.add_middleware(CachedJobReads)
    app.add_middleware(Edge)
    app.add_middleware(Observe)
    app.add_middleware(
        InternalPort,
        state=app.state,
        host=settings.http_host,
        port=settings.internal_port,
        reuse_port=settings.http_workers > 1,
        limits=settings,
    )
    app.add_middleware(
        MetricsPort,
        host=settings.http_host,
        port=settings.metrics_port,
        reuse_port=settings.http_workers > 1,
        limits=settings,
    )
    return app


def app_from_environment() -> Any:
    """The app of one server process: settings from the environment, logging and tracing set up."""
    settings = Settings()
    telemetry.setup_logging("gateway", settings.log_level, settings.log_format)
    telemetry.setup_tracing("gateway")
    app = telemetry.head_sampling(create_app(settings), starts_pipeline=JOB_CREATING_ROUTES)
    tune_gc()
    return app


def main() -> None:
    import uvicorn

    settings = Settings()  # validated before any worker starts, so bad settings fail once and clearly
    uvicorn.run(
        "gateway.main:app_from_environment",
        factory=True,
        workers=settings.http_workers,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        loop="uvloop",
        **server_options(settings),  # httptools, with limits on the head, read timeouts and keep-alive
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )


if __name__ == "__main__":
    main()
