"""The analyzer's settings, from the environment."""

from __future__ import annotations

from pydantic import Field

from stemflow_shared.settings import BlobSettings, RedisSettings, ServiceSettings


class Settings(ServiceSettings, BlobSettings, RedisSettings):
    http_port: int = 9103
    workers: int = Field(default=1, ge=1, description="Warm analysis processes (one per core of the budget)")
    prefetch: int = Field(default=0, ge=0, description="0 = as many messages as workers")
