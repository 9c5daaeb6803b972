"""`mix.requested` in, `mix.progress` while it renders, `mix.completed` (or `.failed`) out.

Practice mixes run here, in the analyzer's warm CPU processes, rather than on the separator: mixing is
CPU work on files that already exist (the stems, the normalised audio), it needs the analysed beats
for the click, and GPU nodes should spend their few CPUs feeding the device, not stretching audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import soundfile as sf

from stemflow_shared import metrics
from stemflow_shared.events import (
    MIX_COMPLETED,
    MIX_FAILED,
    MIX_PROGRESS,
    MIX_REQUESTED,
    ErrorInfo,
    Event,
    EventSpec,
    MixCompleted,
    MixFailed,
    MixFile,
    MixProgress,
    MixRequested,
    event_id,
    make_event,
)
from stemflow_shared.messaging import Handler
from stemflow_shared.storage import BlobNotFound

from .mixing import MEDIA_TYPES, MixError, MixPlan, Rendered, render

log = logging.getLogger(__name__)
SOURCE = "/stemflow/analyzer"
PROGRESS_STEP = 5.0  # percent between two reports from a worker process


def render_mix(plan: MixPlan, out_path: str, progress: Any | None = None) -> Rendered:
    """Runs in a worker process: render, reporting the percent on `progress` (a managed queue) as it goes."""
    last = [-PROGRESS_STEP]

    def report(percent: float) -> None:
        if progress is not None and percent - last[0] >= PROGRESS_STEP and percent < 100.0:
            last[0] = percent
            progress.put(percent)

    return render(plan, out_path, report)


def plan_of(request: MixRequested, stems: list[tuple[str, float]], original: str) -> MixPlan:
    options = request.options
    return MixPlan(
        stems=stems,
        original=original,
        tempo=options.tempo,
        semitones=options.pitch_semitones,
        start=options.start,
        end=options.end,
        loops=options.loops,
        click=options.click,
        beats=request.beats,
        downbeats=request.downbeats,
        format=options.format,
        bit_depth=options.resolved_bit_depth,
        quality=options.quality,
    )


class Mixer:
    """Renders practice mixes in the analyzer's process pool and publishes their progress."""

    def __init__(
        self,
        pool: ProcessPoolExecutor,
        blobs: Any,
        broker: Any,
        *,
        manager: Any | None = None,
        progress_interval_s: float = 0.5,
    ) -> None:
        self._pool = pool
        self._blobs = blobs
        self._broker = broker
        self._manager = manager  # a multiprocessing Manager whose queues carry progress out of the pool
        self._interval = progress_interval_s

    def handlers(self) -> dict[EventSpec[Any], Handler]:
        return {MIX_REQUESTED: self.on_requested}

    async def on_requested(self, event: Event[MixRequested]) -> list[Event[Any]]:
        request = event.data
        await self._progress(request, 0.0)
        started = time.perf_counter()
        try:
            async with contextlib.AsyncExitStack() as files:
                stems = [
                    (str(await files.enter_async_context(self._blobs.local_path(stem.blob_key))), stem.gain)
                    for stem in request.stems
                    if stem.gain > 0
                ]
                original = str(await files.enter_async_context(self._blobs.local_path(request.audio_key)))
                work = Path(files.enter_context(tempfile.TemporaryDirectory(prefix="stemflow-mix-")))
                out = work / f"mix.{request.options.format}"
                rendered = await self._render(request, plan_of(request, stems, original), out)
                stored = await self._blobs.put_file(request.output_key, out)
        except BlobNotFound as exc:
            return [self._failed(request, "stem_missing", f"a file of the job is gone ({exc})")]
        except MixError as exc:
            return [self._failed(request, exc.code, exc.message)]
        except (ValueError, sf.LibsndfileError) as exc:
            return [self._failed(request, "mix_error", str(exc)[:500])]
        elapsed = time.perf_counter() - started
        log.info(
            "mix %s of job %s: %.1f s of audio in %.2f s (%.2f s CPU)",
            request.mix_id,
            request.job_id,
            rendered.duration_s,
            elapsed,
            rendered.render_s,
        )
        metrics.STAGE_DURATION.labels("mix", "", "completed").observe(elapsed)
        metrics.AUDIO_SECONDS.labels("mix").inc(rendered.duration_s)
        metrics.REALTIME_FACTOR.labels("mix").observe(rendered.duration_s / max(elapsed, 1e-6))
        file = MixFile(
            blob_key=request.output_key,
            format=request.options.format,
            media_type=MEDIA_TYPES[request.options.format],
            size=stored.size,
            duration_s=round(rendered.duration_s, 3),
            sample_rate=rendered.sample_rate,
            bit_depth=request.options.resolved_bit_depth,
            loudness_lufs=rendered.loudness_lufs,
            gain_db=rendered.gain_db,
            render_s=rendered.render_s,
        )
        data = MixCompleted(job_id=request.job_id, mix_id=request.mix_id, file=file)
        return [make_event(MIX_COMPLETED, data, source=SOURCE, id=_id(request, MIX_COMPLETED.name))]

    async def _render(self, request: MixRequested, plan: MixPlan, out: Path) -> Rendered:
        loop = asyncio.get_running_loop()
        progress = self._manager.Queue() if self._manager is not None else None
        future = loop.run_in_executor(self._pool, render_mix, plan, str(out), progress)
        if progress is None:
            return await future
        last_sent = time.monotonic()
        while not future.done():
            percent = await asyncio.to_thread(_next, progress, 0.2)
            if percent is not None and time.monotonic() - last_sent >= self._interval:
                last_sent = time.monotonic()
                await self._progress(request, percent)
        return await future

    async def _progress(self, request: MixRequested, percent: float) -> None:
        """Best effort: a lost progress event changes nothing that the terminal event does not say."""
        data = MixProgress(job_id=request.job_id, mix_id=request.mix_id, percent=round(percent, 1))
        try:
            await self._broker.publish(make_event(MIX_PROGRESS, data, source=SOURCE))
        except Exception as exc:
            log.debug("mix progress event dropped: %s", exc)

    def _failed(self, request: MixRequested, code: str, message: str) -> Event[Any]:
        metrics.STAGE_FAILURES.labels("mix", code).inc()
        data = MixFailed(job_id=request.job_id, mix_id=request.mix_id, error=ErrorInfo(code=code, message=message))
        return make_event(MIX_FAILED, data, source=SOURCE, id=_id(request, MIX_FAILED.name))


def _id(request: MixRequested, name: str) -> str:
    """Stable per mix and attempt, so a redelivery republishes the same event."""
    return event_id(request.job_id, request.mix_id, str(request.attempt), name)


def _next(progress: Any, timeout_s: float) -> float | None:
    try:
        return float(progress.get(timeout=timeout_s))
    except queue.Empty:
        return None
    except (EOFError, OSError):  # the manager is shutting down
        return None
