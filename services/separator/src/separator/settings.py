"""The separator's settings, from the environment."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from stemflow_shared.settings import BlobSettings, RedisSettings, ServiceSettings
from stemflow_shared.topology import MODELS


class Settings(ServiceSettings, BlobSettings, RedisSettings):
    http_port: int = 9102
    # Jobs in progress at once per queue: their segments share the device's batches.
    prefetch: int = 2
    model_repo: Path | None = Field(default=None, description="Local demucs model repository; unset = the hub")
    models: str = Field(default="htdemucs", description="Comma-separated models this worker serves and preloads")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(default=0, ge=0, description="CPU threads for torch; 0 = torch's default")
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="Forward-pass precision; auto = float16 autocast on CUDA, float32 on CPU"
    )
    max_batch: int = Field(default=0, ge=0, description="Segments per forward pass; 0 = 8 on CUDA, 1 on CPU")
    batch_wait_ms: float = Field(default=5.0, ge=0, description="How long a batch may wait for more segments")
    engine: Literal["auto", "torch", "onnx", "openvino"] = Field(
        default="auto",
        description="What runs the network: auto = openvino on CPU in float32 (torch where it cannot), torch on CUDA",
    )
    export_cache_dir: Path | None = Field(
        default=None, description="Exported networks' cache; unset = next to the weights (MODEL_REPO or torch hub's)"
    )
    torch_compile: bool = Field(
        default=False, description="torch.compile each model at start (minutes per model, then faster segments)"
    )
    progress_interval_s: float = Field(default=0.25, gt=0, description="At most one progress event per interval")
    cancel_poll_s: float = Field(default=0.5, gt=0)
    work_dir: str | None = None
    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="This replica's name in the pool announcements (default: host and process id)",
    )
    announce_interval_s: float = Field(default=5.0, gt=0, description="How often the served models are announced")

    @field_validator("models")
    @classmethod
    def _served_models_have_queues(cls, value: str) -> str:
        names = [m.strip() for m in value.split(",") if m.strip()]
        unknown = [name for name in names if name not in MODELS]
        if not names or unknown:
            raise ValueError(f"models must name some of {', '.join(MODELS)}; unknown: {', '.join(unknown) or 'none'}")
        return value

    @property
    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]
