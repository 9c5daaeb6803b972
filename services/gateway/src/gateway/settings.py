"""The gateway's settings, from the environment."""

from __future__ import annotations

from pydantic import Field, SecretStr

from stemflow_shared.httpserver import HttpLimits
from stemflow_shared.settings import BlobSettings, RedisSettings, ServiceSettings

DEFAULT_MEDIA_TYPES = (
    "audio/wav,audio/x-wav,audio/wave,audio/vnd.wave,audio/flac,audio/x-flac,audio/mpeg,audio/mp3,audio/ogg,"
    "audio/opus,audio/mp4,audio/x-m4a,audio/aac,audio/aiff,audio/x-aiff,application/octet-stream"
)


class Settings(ServiceSettings, BlobSettings, RedisSettings, HttpLimits):
    mongodb_url: str = Field(description="MongoDB URL (a replica set)")
    http_port: int = 8000
    metrics_port: int = Field(
        default=9100, ge=0, le=65535, description="/metrics is served here, not on the API port (0: any free port)"
    )
    internal_port: int = Field(
        default=9200, ge=0, le=65535, description="The internal API (the notifier's queries) is served here (0: any)"
    )
    internal_token: SecretStr | None = Field(
        default=None, description="Service token the internal API requires; without it, it refuses every request"
    )
    http_workers: int = Field(
        default=1, ge=1, le=64, description="Server processes; each has its own /metrics (prefer more replicas)"
    )
    public_url: str = Field(default="http://127.0.0.1:8000", description="Base URL clients use for links")
    events_url: str = Field(default="ws://127.0.0.1:8001/v1/ws", description="The notifier's WebSocket URL")
    max_upload_bytes: int = Field(default=1024 * 1024 * 1024, gt=0)
    accepted_media_types: str = DEFAULT_MEDIA_TYPES
    job_cache_ttl_s: int = Field(default=3600, gt=0)
    rate_limit_per_minute: int = Field(default=600, ge=0, description="Requests per API key per minute; 0 = off")
    job_retention_hours: float = Field(default=24 * 7, gt=0)
    outbox_sweep_interval_s: float = Field(default=2.0, gt=0)
    outbox_grace_s: float = Field(default=5.0, ge=0)
    retention_sweep_interval_s: float = Field(default=300.0, gt=0)
    stuck_job_timeout_s: float = Field(
        default=3600.0,
        ge=0,
        description="An unfinished job that has not changed for this long is failed (stage_timeout); 0 = never",
    )
    stuck_mix_timeout_s: float = Field(
        default=900.0,
        ge=0,
        description="A practice mix queued or running that has not changed for this long is failed (mix_timeout); "
        "0 = never",
    )
    job_watch_interval_s: float = Field(
        default=30.0, gt=0, description="How often the unfinished jobs are sampled for metrics and timed out"
    )
    mongodb_max_pool_size: int = Field(default=100, gt=0)
    mongodb_min_pool_size: int = Field(default=4, ge=0)
    redis_max_connections: int = Field(default=200, gt=0, description="Size of the Redis connection pool")
    slow_mongodb_command_ms: float = Field(default=100.0, gt=0)
    list_max_limit: int = Field(default=100, gt=0)
    list_cache_pages: int = Field(
        default=64, ge=1, description="List pages cached per owner until one of the owner's jobs changes"
    )
    batch_max_jobs: int = Field(default=50, ge=1, le=500, description="Songs one POST /v1/batches may carry")
    max_json_body_bytes: int = Field(default=64 * 1024, gt=0, description="Largest JSON submission accepted")
    result_reuse_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=0, description="How long finished results stay reusable by fingerprint; 0 = off"
    )
    gzip_level: int = Field(default=1, ge=1, le=9, description="Compression level of responses over 1 KB")

    @property
    def media_types(self) -> frozenset[str]:
        return frozenset(t.strip().lower() for t in self.accepted_media_types.split(",") if t.strip())
