"""The ingest service's settings, from the environment."""

from __future__ import annotations

from pydantic import Field

from stemflow_shared.settings import BlobSettings, RedisSettings, ServiceSettings


class Settings(ServiceSettings, BlobSettings, RedisSettings):
    http_port: int = 9101
    prefetch: int = 2
    min_duration_s: float = Field(default=1.0, gt=0)
    max_duration_s: float = Field(default=1200.0, gt=0)
    max_channels: int = Field(default=8, ge=1)
    min_sample_rate: int = Field(default=8000, gt=0)
    max_sample_rate: int = Field(default=384000, gt=0)
    max_download_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    download_timeout_s: float = Field(default=60.0, gt=0)
    max_redirects: int = Field(default=3, ge=0)
    allow_private_urls: bool = Field(default=False, description="Allow source URLs on private/loopback addresses")
    reuse_results: bool = Field(
        default=True, description="Reuse an identical finished job's results (same audio and options)"
    )
    work_dir: str | None = Field(default=None, description="Where temporary files go (default: the system's)")
