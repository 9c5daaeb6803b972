"""`mix.requested` in, `mix.progress` while it renders, `mix.completed` (or `.failed`) out.

Practice mixes run here, in the analyzer's warm CPU processes, rather than on the separator: mixing is
CPU work on files that already exist (the stems, the normalised audio), it needs the analysed beats
for the click, and GPU nodes should spend their few CPUs feeding the device, not stretching audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import soundfile as sf

from stemflow_shared import metrics
from stemflow_shared.events import (
    MEDIA_TYPES,
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

from .mixing import MixError, MixPlan, Rendered, render

log = logging.getLogger(__name__)
SOURCE = "/stemflow/analyzer"
PROGRESS_STEP = 5.0  # percent between two reports from a worker process


# In a worker process: the queue its renders report their percent on (set by `start_mix_worker`).
_progress: Any = None


def start_mix_worker(progress: Any, initializer: Callable[[], None]) -> None:
    """Process initialiser: keep the pool's progress queue, then the worker's own initialiser."""
    global _progress
    _progress = progress
    initializer()


def render_mix(plan: MixPlan, out_path: str, mix_id: str | None = None) -> Rendered:
    """Runs in a worker process: render, reporting (mix_id, percent) on the pool's progress queue as it goes."""
    last = [-PROGRESS_STEP]

    def report(percent: float) -> None:
        if _progress is not None and mix_id and percent - last[0] >= PROGRESS_STEP and percent < 100.0:
            last[0] = percent
            _progress.put((mix_id, percent))

    return render(plan, out_path, report)


class ProgressRelay:
    """Reads the worker processes' progress queue on a thread and hands each report to the mix waiting for it."""

    def __init__(self, progress: Any) -> None:
        self.queue = progress
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[float]]] = {}
        self._thread = threading.Thread(target=self._run, name="mix-progress", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, mix_id: str) -> Iterator[asyncio.Queue[float]]:
        """The percents reported for `mix_id` while the block runs."""
        reports: asyncio.Queue[float] = asyncio.Queue()
        self._waiting[mix_id] = (asyncio.get_running_loop(), reports)
        try:
            yield reports
        finally:
            self._waiting.pop(mix_id, None)

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get()
            except (EOFError, OSError):
                return
            if item is None:
                return
            mix_id, percent = item
            found = self._waiting.get(mix_id)
            if found is not None:
                loop, reports = found
                loop.call_soon_threadsafe(reports.put_nowait, percent)


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
        relay: ProgressRelay | None = None,
        progress_interval_s: float = 0.5,
    ) -> None:
        self._pool = pool
        self._blobs = blobs
        self._broker = broker
        self._relay = relay  # carries the renders' percent out of the pool (None: only start and end)
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
        if self._relay is None:
            return await loop.run_in_executor(self._pool, render_mix, plan, str(out))
        with self._relay.watch(request.mix_id) as reports:
            future = loop.run_in_executor(self._pool, render_mix, plan, str(out), request.mix_id)
            last_sent = time.monotonic()
            while not future.done():
                waiting = asyncio.ensure_future(reports.get())
                await asyncio.wait({future, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    continue
                if time.monotonic() - last_sent >= self._interval:
                    last_sent = time.monotonic()
                    await self._progress(request, waiting.result())
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
