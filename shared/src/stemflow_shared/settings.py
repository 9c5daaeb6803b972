"""Settings base: every service's settings class extends these, read from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .topology import DEFAULT_NAMESPACE


class ServiceSettings(BaseSettings):
    """What every service needs: the broker, a namespace, logging and its own HTTP port."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    amqp_url: str = Field(description="RabbitMQ URL, e.g. amqp://user:pass@host:5672/")
    stemflow_namespace: str = Field(default=DEFAULT_NAMESPACE, pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$")
    http_host: str = "0.0.0.0"
    http_port: int = Field(ge=1, le=65535)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    delivery_limit: int = Field(default=5, ge=1, le=100)
    prefetch: int = Field(default=8, ge=1, le=1000)
    shutdown_grace_s: float = Field(default=20.0, gt=0)

    @property
    def redis_prefix(self) -> str:
        return f"{self.stemflow_namespace}:"


class HarnessKnobs(BaseSettings):
    """Knobs only tests and benchmarks turn, read from `STEMFLOW_TEST_*` variables and named nowhere in the
    deployment files (tests/deploy keeps it so): they widen race windows or fake hardware limits."""

    model_config = SettingsConfigDict(env_prefix="STEMFLOW_TEST_", extra="ignore", frozen=True)

    outbox_relay_delay_s: float = Field(
        default=0.0, ge=0, description="gateway: hold back the relaying of new events (the sweeper still publishes)"
    )
    simulated_device_memory_mb: float = Field(
        default=0.0, ge=0, description="separator: pretend the device has this much memory (OOM handling); 0 = off"
    )


class BlobSettings(BaseSettings):
    """The blob store: the filesystem (a shared volume) or MongoDB GridFS."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    blob_backend: Literal["filesystem", "gridfs"] = "filesystem"
    blob_dir: Path | None = None
    mongodb_url: str | None = None
    mongodb_db: str = "stemflow"

    @model_validator(mode="after")
    def _backend_configured(self) -> BlobSettings:
        if self.blob_backend == "filesystem" and self.blob_dir is None:
            raise ValueError("BLOB_DIR is required with BLOB_BACKEND=filesystem")
        if self.blob_backend == "gridfs" and not self.mongodb_url:
            raise ValueError("MONGODB_URL is required with BLOB_BACKEND=gridfs")
        return self


class RedisSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    redis_url: str = Field(description="Redis URL, e.g. redis://host:6379/0")
