"""Composition root of the notifier: WebSocket endpoint, per-replica event queue, webhooks, ops endpoints."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import redis.asyncio as redis
import uvicorn
from fastapi import FastAPI
from starlette.routing import WebSocketRoute

from stemflow_shared import telemetry
from stemflow_shared.health import PROBLEM_HANDLERS, health_routes
from stemflow_shared.httpserver import server_options
from stemflow_shared.runtime import connect_broker, tune_gc
from stemflow_shared.topology import NOTIFIER_QUEUE, WEBHOOKS_QUEUE

from .gateway_client import GatewayClient
from .handlers import job_event_handlers, webhook_handlers
from .heap import freeze_survivors
from .hub import Hub
from .protocol import websocket_protocol
from .relay import Relay
from .resume import EventLog
from .settings import Settings
from .webhooks import Policy, Webhooks
from .websocket import websocket_route

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis_client = redis.from_url(settings.redis_url)
        http = httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False)
        gateway_http = _gateway_http(settings)
        gateway = GatewayClient(
            gateway_http,
            cache_ttl_s=settings.principal_cache_ttl_s,
            cache_size=settings.principal_cache_max,
            unknown_size=settings.unknown_key_cache_max,
        )
        hub = Hub()
        event_log = EventLog(redis_client, settings.redis_prefix, settings.resume_stream_max, settings.resume_ttl_s)
        webhooks = Webhooks(http, gateway, _secret(settings), _policy(settings))
        broker = await connect_broker(settings, "notifier")
        app.state.settings = settings
        app.state.hub = hub
        app.state.event_log = event_log
        app.state.gateway = gateway
        app.state.checks = {"gateway": gateway.ready, "redis": redis_client.ping, "broker": broker.ready}
        await broker.consume(
            NOTIFIER_QUEUE,
            job_event_handlers(Relay(event_log, hub)),
            replica=settings.replica_id,
            prefetch=settings.events_prefetch,
        )
        await broker.consume(WEBHOOKS_QUEUE, webhook_handlers(webhooks), prefetch=settings.webhook_concurrency)
        if settings.webhook_secret is None:
            log.warning("WEBHOOK_SECRET is not set: jobs with a callback_url are dead-lettered, not called back")
        log.info("notifier ready on port %d (replica %s)", settings.http_port, settings.replica_id)
        try:
            yield
        finally:
            await broker.stop_consuming(settings.shutdown_grace_s)
            await broker.close()
            await http.aclose()
            await gateway_http.aclose()
            await redis_client.aclose()

    app = FastAPI(
        title="Stemflow notifier",
        version="1.0.0",
        lifespan=lifespan,
        telemetry=telemetry.fastapi_telemetry(),
        exception_handlers=PROBLEM_HANDLERS,  # a 404 is problem+json, as the gateway's are
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    # Starlette's route, not FastAPI's: the endpoint takes only the WebSocket, and FastAPI's dependency solving
    # would keep two exit stacks, a solved-dependency record and a response per connection for as long as it is open.
    app.router.routes.append(WebSocketRoute("/v1/ws", websocket_route))
    for route in health_routes(lambda request: request.app.state.checks):
        app.router.routes.append(route)
    return app


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    """The uvicorn configuration: HTTP limits and timeouts, the notifier's WebSocket protocol, keep-alive pings,
    message size limit."""
    return uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        **server_options(settings),  # httptools, with limits on the request head, read timeouts and keep-alive
        ws=websocket_protocol(settings),
        ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_timeout_s,
        ws_max_size=settings.max_message_bytes,
        ws_per_message_deflate=settings.deflate,
        backlog=4096,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )


def _secret(settings: Settings) -> bytes | None:
    return settings.webhook_secret.get_secret_value().encode() if settings.webhook_secret else None


def _policy(settings: Settings) -> Policy:
    return Policy(
        max_attempts=settings.webhook_max_attempts,
        backoff_s=settings.webhook_backoff_s,
        backoff_max_s=settings.webhook_backoff_max_s,
        timeout_s=settings.webhook_timeout_s,
        allow_private=settings.webhook_allow_private,
    )


def _gateway_http(settings: Settings) -> httpx.AsyncClient:
    """The pooled client of the gateway's internal API, with the service token on every request."""
    token = settings.internal_token.get_secret_value()
    return httpx.AsyncClient(
        base_url=settings.gateway_internal_url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=settings.gateway_timeout_s,
        limits=httpx.Limits(max_connections=settings.gateway_max_connections),
        follow_redirects=False,
    )


def main() -> None:
    settings = Settings()
    telemetry.setup_logging("notifier", settings.log_level, settings.log_format)
    telemetry.setup_tracing("notifier")
    # One line per WebSocket opened is noise at the scale of thousands of clients.
    if settings.log_level.upper() != "DEBUG":
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    app = telemetry.head_sampling(create_app(settings))  # the WebSocket: traced at the request ratio
    tune_gc()  # start-up objects frozen
    freeze_survivors()  # and from now on whatever survives a full collection (thousands of WebSockets)
    uvicorn.Server(server_config(app, settings)).run()


if __name__ == "__main__":
    main()
