"""Separating a mix into stems: tensor in, stems out, with progress and cancellation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from .engine import SegmentEngine
from .mix import ArraySource
from .models import LoadedModel
from .options import (
    FOUR_STEMS,
    QUALITY_PRESETS,
    RESIDUAL,
    SeparationCancelled,
    SeparationError,
    output_names,
    quality_preset,
    stem_groups,
)
from .stream import separate_stream

__all__ = [
    "FOUR_STEMS",
    "QUALITY_PRESETS",
    "RESIDUAL",
    "ArraySink",
    "SeparationCancelled",
    "SeparationError",
    "quality_preset",
    "separate",
    "stem_groups",
]


class ArraySink:
    """Collects a stem's blocks in memory."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []

    def write(self, block: np.ndarray) -> np.ndarray:
        self.blocks.append(block)
        return block

    def array(self) -> np.ndarray:
        return np.concatenate(self.blocks, axis=1)


def separate(
    model: LoadedModel,
    mix: np.ndarray,
    *,
    quality: str = "fast",
    stems: int = 4,
    residual: bool = False,
    device: str = "cpu",
    engine: SegmentEngine | None = None,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Split `mix`, float32 (channels, samples) at the model's rate, into stems of the same shape.

    stems=4 gives drums, bass, other and vocals (a 6-source model's guitar and piano fold into
    other); stems=6 needs a 6-source model; stems=2 gives vocals and accompaniment; `residual`
    adds the mix minus those. The result equals demucs' apply_model with the quality's settings.
    `progress` receives increasing values from 0.0 to 1.0; `should_cancel` is polled between
    segments. Segments run on `engine` (shared with other jobs) or on a private one on `device`.
    """
    sinks = {name: ArraySink() for name in output_names(model.sources, stems, residual)}
    with contextlib.ExitStack() as stack:
        if engine is None:
            engine = stack.enter_context(SegmentEngine(device))
        separate_stream(
            engine,
            model,
            ArraySource(mix, model.samplerate),
            sinks,
            quality=quality,
            stems=stems,
            residual=residual,
            progress=progress,
            should_cancel=should_cancel,
            seed=seed,
        )
    return {name: sink.array() for name, sink in sinks.items()}
