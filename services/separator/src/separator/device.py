"""Choosing the device, precision and engine, and the segment engine that runs on them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from stemflow_shared.settings import HarnessKnobs

from .engine import BatchReport, SegmentEngine
from .export import default_cache_dir, usable_cache_dir
from .runtimes import available
from .settings import Settings

# On CUDA, float16 autocast: on the production htdemucs (random weights, autocast on CPU) its
# output is 65 dB below the signal away from float32's, bfloat16's only 49 dB; a batch that
# overflows float16 is redone in float32 by the engine.
CUDA_PRECISION = "float16"
CUDA_MAX_BATCH = 8
# On CPU, OpenVINO: on 2 threads of the dev machine's AMD EPYC (Zen 4, AVX-512), the production
# htdemucs (random weights, `fast`, 60 s) separates in float32 1.41x faster than torch eager in wall
# time, 1.31x in CPU time (two alternating rounds at load 2), its stems within -88 dB of torch's
# (on an earlier AVX2 host: 1.23x, 1.18x); ONNX Runtime (1.16x, -66 dB) is the fallback where
# OpenVINO is missing. Two segments at once gained nothing there and cost about 520 MB (28e7bdf, reverted).
CPU_ENGINES = ("openvino", "onnx")


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


def pick_engine(wanted: str, device: str, precision: str, compile_models: bool) -> str:
    """On CPU in float32 without torch.compile, the first installed of CPU_ENGINES; else torch."""
    if wanted != "auto":
        return wanted
    if device != "cpu" or precision != "float32" or compile_models:
        return "torch"
    return next((name for name in CPU_ENGINES if available(name)), "torch")


def make_engine(
    settings: Settings,
    device: str,
    on_batch: Callable[[BatchReport], None] | None = None,
    knobs: HarnessKnobs | None = None,
) -> SegmentEngine:
    """The engine the settings describe (and, in tests, the knobs: a simulated memory budget); not started."""
    knobs = knobs or HarnessKnobs()
    max_batch = settings.max_batch or (CUDA_MAX_BATCH if device == "cuda" else 1)
    precision = pick_precision(settings.precision, device)
    backend = pick_engine(settings.engine, device, precision, settings.torch_compile)
    export_dir = None
    if backend != "torch":
        export_dir = usable_cache_dir(settings.export_cache_dir or default_cache_dir(settings.model_repo))
    return SegmentEngine(
        device,
        max_batch=max_batch,
        batch_wait_s=settings.batch_wait_ms / 1000,
        precision=precision,
        memory_budget_bytes=int(knobs.simulated_device_memory_mb * 2**20),
        compile_models=settings.torch_compile,
        on_batch=on_batch,
        backend=backend,
        export_dir=export_dir,
        threads=settings.torch_threads,
        # The worker's models run on this engine only: once a runtime holds a network, torch's copy goes.
        release_weights=backend != "torch",
    )
