"""The notifier's settings, from the environment."""

from __future__ import annotations

import socket

from pydantic import Field, SecretStr

from stemflow_shared.httpserver import HttpLimits
from stemflow_shared.settings import RedisSettings, ServiceSettings


class Settings(ServiceSettings, RedisSettings, HttpLimits):
    http_port: int = 8001
    # The gateway owns job state; the notifier asks its internal API (stemflow_shared.internal).
    gateway_internal_url: str = Field(description="The gateway's internal API, e.g. http://gateway:9200")
    internal_token: SecretStr = Field(description="The service token the gateway's internal API requires")
    gateway_timeout_s: float = Field(default=5.0, gt=0, description="Limit of one request to the gateway")
    gateway_max_connections: int = Field(default=64, ge=1, description="Connections to the gateway, pooled")
    principal_cache_ttl_s: float = Field(
        default=10.0, ge=0, description="How long an API key's owner (or its absence) is remembered; 0 = not"
    )
    principal_cache_max: int = Field(default=10_000, ge=0, description="Known API keys remembered")
    unknown_key_cache_max: int = Field(default=1_000, ge=0, description="Unknown API keys remembered")
    replica_id: str = Field(
        default_factory=lambda: socket.gethostname().replace(".", "-")[:40], pattern=r"^[A-Za-z0-9_-]{1,64}$"
    )
    events_prefetch: int = Field(default=256, ge=1, le=10_000, description="job.* messages in flight per replica")

    batch_window_ms: float = Field(default=100.0, ge=0, description="How long events wait for company; 0 = no batching")
    batch_max_events: int = Field(default=50, ge=1)
    snapshot_max_jobs: int = Field(
        default=100, ge=0, description="Unfinished jobs whose state a subscription to all jobs gets first"
    )
    max_subscriptions: int = Field(default=1000, ge=1, description="Jobs one connection may subscribe to")
    client_queue_max: int = Field(default=1000, ge=1, description="Undelivered events a client may have pending")
    send_timeout_s: float = Field(default=10.0, gt=0, description="A write blocked this long drops the connection")
    intake_turn_ms: float = Field(
        default=5.0,
        gt=0,
        description="Longest time one event-loop iteration spends on what clients sent (frames, closes); the rest "
        "waits for the next iterations, so that thousands of clients leaving at once do not stop the others",
    )
    ping_interval_s: float = Field(default=20.0, gt=0)
    ping_timeout_s: float = Field(default=20.0, gt=0)
    idle_timeout_s: float = Field(default=300.0, gt=0, description="Close after this long with no traffic either way")
    max_message_bytes: int = Field(default=64 * 1024, ge=1024, description="Largest message a client may send")
    deflate: bool = Field(default=True, description="Offer permessage-deflate")
    deflate_min_bytes: int = Field(default=1024, ge=0, description="Smaller frames are sent uncompressed")
    deflate_context_takeover: bool = Field(
        default=True, description="Keep compression history between frames: half the bytes, ~14 KB per client"
    )

    resume_stream_max: int = Field(default=200, ge=1, description="Events kept per job for resume (10x per owner)")
    resume_ttl_s: int = Field(default=24 * 3600, gt=0)

    webhook_secret: SecretStr | None = Field(
        default=None, description="HMAC key of webhook signatures; without it, webhooks are not sent"
    )
    webhook_allow_private: bool = Field(default=False, description="Allow private addresses (tests, dev only)")
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=6, ge=1, le=20)
    webhook_backoff_s: float = Field(default=1.0, gt=0, description="First retry delay; doubles each attempt")
    webhook_backoff_max_s: float = Field(default=60.0, gt=0)
    webhook_concurrency: int = Field(default=32, ge=1, le=1000, description="Webhooks in flight per replica")
