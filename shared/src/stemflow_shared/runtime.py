"""Process lifecycle shared by the services: wait for a stop signal, then shut down in order."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .health import Check, health_app
from .httpserver import http_server
from .messaging import Broker, BrokerOptions
from .storage import BlobStore, make_blob_store
from .topology import Names

log = logging.getLogger(__name__)


async def wait_for_stop_signal(stop: asyncio.Event | None = None) -> None:
    """Return on SIGTERM or SIGINT (or when `stop` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


# A full collection is considered after this many collections of the middle generation (CPython: 10,
# so after ~70,000 new objects). Long-lived objects made at a steady rate set off full collections of
# the whole heap: every WebSocket the notifier holds (~150 objects; with the default, a reconnect storm
# of 10,000 clients set off a dozen of them, 6.5 s of pauses in 20 s: bench/notifier.py), every span
# the gateway's exporter queues (~60 µs per traced request: bench/tracing.py). Young collections stay
# small and frequent, so pauses in the steady state stay short; a full one still runs every ~7 M objects.
# The notifier goes further (notifier.heap): it also freezes whatever survives a middle collection, so
# its oldest generation stays empty and no collection walks its open WebSockets.
GC_FULL_AFTER = 1000


def tune_gc() -> None:
    """Keep the long-lived start-up objects out of later collections, and collect the whole heap less often."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, GC_FULL_AFTER)


async def shutdown(steps: list[tuple[str, Callable[[], Awaitable[object]]]], timeout_s: float) -> None:
    """Run shutdown steps in order, each bounded, logging rather than raising."""
    for name, step in steps:
        try:
            await asyncio.wait_for(step(), timeout_s)
        except Exception as exc:
            log.warning("shutdown step %s failed: %s", name, exc)
    log.info("stopped")


async def connect_broker(settings: Any, service: str, *, prefetch: int | None = None) -> Broker:
    """The service's broker connection, with the namespace and limits from its settings."""
    options = BrokerOptions(delivery_limit=settings.delivery_limit, prefetch=prefetch or settings.prefetch)
    return await Broker(settings.amqp_url, Names(settings.stemflow_namespace), service, options).connect()


def open_blob_store(settings: Any) -> tuple[BlobStore, Callable[[], Awaitable[object]]]:
    """The blob store from BlobSettings, with the coroutine that closes what it opened."""
    if settings.blob_backend != "gridfs":
        return make_blob_store(settings), _nothing
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[Any] = AsyncMongoClient(settings.mongodb_url, tz_aware=True)
    return make_blob_store(settings, lambda: client[settings.mongodb_db]), client.close


async def serve_worker(
    settings: Any,
    service: str,
    broker: Broker,
    checks: Mapping[str, Check],
    closers: list[tuple[str, Callable[[], Awaitable[object]]]],
) -> None:
    """Serve the ops endpoints until SIGTERM, then stop consuming, drain and close in order."""
    server = http_server(health_app({"broker": broker.ready, **checks}), settings.http_host, settings.http_port)
    serving = asyncio.create_task(server.serve())
    log.info("%s ready on port %d", service, settings.http_port)
    await wait_for_stop_signal()
    log.info("%s stopping", service)
    server.should_exit = True
    await shutdown(
        [
            ("consumers", lambda: broker.stop_consuming(settings.shutdown_grace_s)),
            ("broker", broker.close),
            ("http", lambda: serving),
            *closers,
        ],
        settings.shutdown_grace_s,
    )


async def _nothing() -> None:
    return None
