"""One job through the engine: mix windows in, stem blocks out, as soon as each stretch is final."""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .engine import EngineClosed, SegmentEngine, SegmentOutOfMemory
from .join import Joiner
from .mix import MixSource, WindowReader, normalisation
from .models import LoadedModel
from .options import RESIDUAL, SeparationCancelled, SeparationError, output_names, quality_preset, stem_groups
from .plan import Plan, PlanError, Segment, make_plan, release_points, total_work


class StemSink(Protocol):
    """Where one stem's blocks go; `write` returns the samples as a decoder will read them back."""

    def write(self, block: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Separated:
    """What a separation measured besides its stems."""

    names: tuple[str, ...]
    frames: int
    reconstruction_error_db: float | None


def separate_stream(
    engine: SegmentEngine,
    model: LoadedModel,
    source: MixSource,
    sinks: Mapping[str, StemSink],
    *,
    quality: str = "fast",
    stems: int = 4,
    residual: bool = False,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    seed: int = 0,
) -> Separated:
    """Separate `source` into `sinks` (one per name of options.output_names), block by block.

    Output equals demucs.apply.apply_model on the normalised mix with the quality's shifts and
    overlap, shifts drawn from random.Random(seed). `progress` gets increasing fractions up to
    1.0, one per finished segment; `should_cancel` is polled between segments.
    """
    preset = quality_preset(quality)
    names = output_names(model.sources, stems, residual)
    if set(sinks) != set(names):
        raise ValueError(f"sinks must be {names}, got {tuple(sinks)}")
    if source.channels != model.audio_channels or source.samplerate != model.samplerate:
        raise SeparationError(
            "invalid_audio",
            f"the model takes {model.audio_channels} channels at {model.samplerate} Hz, "
            f"the mix has {source.channels} at {source.samplerate} Hz",
        )
    if should_cancel is not None and should_cancel():
        raise SeparationCancelled("cancelled before separation started")
    try:
        plan = make_plan(model.model, source.frames, int(preset["shifts"]), preset["overlap"], random.Random(seed))
    except PlanError as exc:
        raise SeparationError("model_unsupported", str(exc)) from exc
    mean, std = normalisation(source)
    job = _Job(engine, model, plan, WindowReader(source, mean, std), (mean, std), stems, sinks)
    job.run(progress, should_cancel)
    return Separated(names, source.frames, job.error_db())


class _Job:
    def __init__(
        self,
        engine: SegmentEngine,
        model: LoadedModel,
        plan: Plan,
        reader: WindowReader,
        scale: tuple[torch.Tensor, torch.Tensor],
        stems: int,
        sinks: Mapping[str, StemSink],
    ) -> None:
        self._engine = engine
        self._model_name = model.name
        self._plan = plan
        self._reader = reader
        self._mean, self._std = scale
        self._joiner = Joiner(plan, len(model.sources), model.audio_channels)
        index = {name: i for i, name in enumerate(model.sources)}
        self._groups = {
            name: [index[m] for m in members] for name, members in stem_groups(model.sources, stems).items()
        }
        self._sinks = sinks
        # Enough in flight to fill a batch alone and to have the next window ready.
        self._in_flight = max(2, engine.max_batch)
        self._error_energy = 0.0
        self._mix_energy = 0.0

    def run(self, progress: Callable[[float], None] | None, should_cancel: Callable[[], bool] | None) -> None:
        plan, release = self._plan, release_points(self._plan)
        total, done, last = total_work(plan.segments), 0, -1.0
        pending: deque[tuple[Segment, Future[torch.Tensor]]] = deque()
        cancelled = should_cancel or (lambda: False)
        if progress is not None:
            progress(0.0)
        try:
            for index, segment in enumerate(plan.segments):
                one = plan.passes[segment.pass_index]
                window = self._reader.window(segment.start, one.segment)
                pending.append((segment, self._engine.submit(self, one.model, window, self._model_name)))
                self._reader.release(min(release[index + 1], self._joiner.emitted))
                while pending and (len(pending) >= self._in_flight or index == len(plan.segments) - 1):
                    if cancelled():
                        raise SeparationCancelled("cancelled between segments")
                    finished, future = pending.popleft()
                    self._joiner.add(finished, _result(future))
                    self._emit()
                    done += finished.length
                    if progress is not None and done / total > last:
                        last = done / total
                        progress(last)
        finally:
            for _, future in pending:
                future.cancel()

    def _emit(self) -> None:
        count = self._joiner.ready()
        if count == 0:
            return
        start = self._joiner.emitted
        sources = self._joiner.take(count) * self._std + self._mean
        mix = self._reader.raw(start, start + count)
        delivered = np.zeros(mix.shape, np.float64)
        for name, members in self._groups.items():
            total = sources[members[0]].clone()
            for member in members[1:]:
                total += sources[member]
            delivered += self._sinks[name].write(total.numpy())
        if RESIDUAL in self._sinks:
            self._sinks[RESIDUAL].write((mix - delivered).astype(np.float32))
        error = mix.astype(np.float64) - sources.sum(0, dtype=torch.float64).numpy()
        self._error_energy += float(np.square(error).sum())
        self._mix_energy += float(np.square(mix, dtype=np.float64).sum())

    def error_db(self) -> float | None:
        """How far the model's own stems are from summing to the mix, in dB relative to the mix."""
        if self._mix_energy == 0.0:
            return None
        return 10 * math.log10(max(self._error_energy, 1e-30) / self._mix_energy)


def _result(future: Future[torch.Tensor]) -> torch.Tensor:
    try:
        return future.result()
    except SegmentOutOfMemory as exc:
        raise SeparationError("out_of_memory", str(exc)) from exc
    except EngineClosed:
        raise
    except Exception as exc:
        raise SeparationError("separation_failed", f"separation failed: {exc!r}") from exc
