"""Choosing the device and precision, and the segment engine that runs on them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .engine import BatchReport, SegmentEngine
from .settings import Settings

# On CUDA, float16 autocast: on the production htdemucs (random weights, autocast on CPU) its
# output is 65 dB below the signal away from float32's, bfloat16's only 49 dB; a batch that
# overflows float16 is redone in float32 by the engine.
CUDA_PRECISION = "float16"
CUDA_MAX_BATCH = 8


def pick_device(wanted: str) -> str:
    """cuda when asked or (auto) available, else cpu."""
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def pick_precision(wanted: str, device: str) -> str:
    """float16 on CUDA, float32 on CPU (no half-precision speed-up there), unless set."""
    if wanted != "auto":
        return wanted
    return CUDA_PRECISION if device == "cuda" else "float32"


def make_engine(
    settings: Settings, device: str, on_batch: Callable[[BatchReport], None] | None = None
) -> SegmentEngine:
    """The engine the settings describe; not started."""
    max_batch = settings.max_batch or (CUDA_MAX_BATCH if device == "cuda" else 1)
    return SegmentEngine(
        device,
        max_batch=max_batch,
        batch_wait_s=settings.batch_wait_ms / 1000,
        precision=pick_precision(settings.precision, device),
        memory_budget_bytes=int(settings.simulated_device_memory_mb * 2**20),
        compile_models=settings.torch_compile,
        on_batch=on_batch,
    )
