"""`audio.ingested` in, stems in the blob store and `separation.completed` (or `.failed`) out."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stemflow_shared import metrics
from stemflow_shared.cancellation import is_cancelled, to_thread_settled
from stemflow_shared.events import (
    AUDIO_INGESTED,
    MEDIA_TYPES,
    SEPARATION_COMPLETED,
    SEPARATION_FAILED,
    SEPARATION_PROGRESS,
    AudioIngested,
    ErrorInfo,
    Event,
    EventSpec,
    SeparationCompleted,
    SeparationProgress,
    StageFailed,
    StemInfo,
    event_id,
    make_event,
)
from stemflow_shared.messaging import Handler
from stemflow_shared.storage import BlobNotFound, stem_key, stems_prefix

from .encode import FORMAT_EXTENSIONS, stem_depth
from .engine import SegmentEngine
from .files import separate_file
from .models import ModelCache, ModelError
from .options import SeparationCancelled, SeparationError
from .stream import Separated

log = logging.getLogger(__name__)
SOURCE = "/stemflow/separator"


class Separator:
    def __init__(
        self, models: ModelCache, engine: SegmentEngine, blobs: Any, redis: Any, broker: Any, settings: Any
    ) -> None:
        self._models = models
        self._engine = engine
        self._blobs = blobs
        self._redis = redis
        self._broker = broker
        self._settings = settings
        # Seconds a job has taken lately (moving average), for the pool's announcement and wait estimates.
        self.mean_job_s: float | None = None

    def handlers(self) -> dict[EventSpec[Any], Handler]:
        return {AUDIO_INGESTED: self.on_ingested}

    async def on_ingested(self, event: Event[AudioIngested]) -> list[Event[Any]]:
        job = event.data
        if job.reused:
            return []
        if not job.options.separate:
            return []
        if await is_cancelled(self._redis, self._settings.redis_prefix, job.job_id):
            return []
        model_name = job.options.model
        run = metrics.StageRun("separation", model_name)
        try:
            stems, separated = await self._separate(job)
        except SeparationCancelled:
            log.info("separation cancelled")
            await self._remove_stems(job)
            return []
        except (ModelError, SeparationError, BlobNotFound) as exc:
            code = getattr(exc, "code", "audio_missing")
            run.failed(code)
            await self._remove_stems(job)
            failed = StageFailed(job_id=job.job_id, target=job.target, error=ErrorInfo(code=code, message=str(exc)))
            return [make_event(SEPARATION_FAILED, failed, source=SOURCE, id=_event_id(job, "separation.failed"))]
        except asyncio.CancelledError:
            # Interrupted, not failed (the connection lost, the service stopping): the message's next delivery
            # writes the same keys again, and a duplicate delivery of it may have published them already.
            raise
        except BaseException:
            await self._remove_stems(job)
            raise
        elapsed = run.completed(job.audio.duration_s)
        log.info(
            "separated %.1f s of audio with %s on %s in %.2f s (%d stems)",
            job.audio.duration_s,
            model_name,
            self._engine.device.type,
            elapsed,
            len(stems),
        )
        self.mean_job_s = elapsed if self.mean_job_s is None else 0.8 * self.mean_job_s + 0.2 * elapsed
        loaded = self._models.get(model_name)
        data = SeparationCompleted(
            job_id=job.job_id,
            target=job.target,
            model=model_name,
            device=self._engine.device.type,
            precision=self._engine.precision,
            untrained=loaded.untrained,
            stems=stems,
            reconstruction_error_db=separated.reconstruction_error_db,
        )
        return [make_event(SEPARATION_COMPLETED, data, source=SOURCE, id=_event_id(job, "separation.completed"))]

    async def _separate(self, job: AudioIngested) -> tuple[list[StemInfo], Separated]:
        loaded = await asyncio.to_thread(self._models.get, job.options.model)
        cancelled = threading.Event()
        progress = _ProgressPublisher(self._broker, job.job_id, self._settings.progress_interval_s, job.target)
        watcher = asyncio.create_task(self._watch_cancel(job.job_id, cancelled))
        try:
            with tempfile.TemporaryDirectory(prefix="stemflow-stems-", dir=self._settings.work_dir) as tmp:
                async with self._blobs.local_path(job.audio.blob_key) as path:
                    # Cancelled (the broker connection lost, the service stopping): the thread stops at the
                    # next segment and ends before the temporary stems are removed.
                    separated, files = await to_thread_settled(
                        separate_file,
                        self._engine,
                        loaded,
                        path,
                        Path(tmp),
                        fmt=job.options.output_format,
                        # As asked, else the source's 16 bits, else 24 (float only when asked).
                        bits=stem_depth(job.options.bit_depth, job.source.bits_per_sample),
                        rate=job.options.sample_rate,
                        quality=job.options.quality,
                        stems=job.options.stems,
                        residual=job.options.residual,
                        progress=progress.report,
                        should_cancel=cancelled.is_set,
                        seed=job_seed(job.job_id),
                        stop=cancelled,
                    )
                return await self._store(job, separated, files, loaded.samplerate), separated
        finally:
            watcher.cancel()
            await progress.close()

    async def _store(
        self, job: AudioIngested, separated: Separated, files: dict[str, tuple[Path, int]], samplerate: int
    ) -> list[StemInfo]:
        fmt = job.options.output_format
        infos: list[StemInfo] = []
        for name, (path, size) in files.items():
            key = stem_key(job.job_id, name, FORMAT_EXTENSIONS[fmt], job.target)
            await self._blobs.put_file(key, path)
            infos.append(
                StemInfo(
                    name=name,
                    format=fmt,
                    media_type=MEDIA_TYPES[fmt],
                    blob_key=key,
                    size=size,
                    duration_s=separated.frames / samplerate,
                )
            )
        return infos

    async def _remove_stems(self, job: AudioIngested) -> None:
        with contextlib.suppress(Exception):
            # Only this target's stems: the other targets of the job are not this failure's to remove.
            await self._blobs.delete_prefix(stems_prefix(job.job_id, job.target))

    async def _watch_cancel(self, job_id: str, cancelled: threading.Event) -> None:
        while not cancelled.is_set():
            try:
                if await is_cancelled(self._redis, self._settings.redis_prefix, job_id):
                    cancelled.set()
                    return
            except Exception as exc:
                log.debug("cancel flag check failed: %s", exc)
            await asyncio.sleep(self._settings.cancel_poll_s)


def _event_id(job: AudioIngested, name: str) -> str:
    """Stable per job (and per target, for a job with several), so a redelivery republishes the same event."""
    return event_id(job.job_id, name) if job.target is None else event_id(job.job_id, name, job.target)


def job_seed(job_id: str) -> int:
    """The job's seed for demucs' random shifts: a redelivered job gives the same stems."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big")


class Throttle:
    """Lets an action through at most once per `interval_s` of `clock`."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval_s
        self._clock = clock
        self._last: float | None = None

    def ready(self) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            return False
        self._last = now
        return True


class _ProgressPublisher:
    """Turns progress callbacks from the worker thread into throttled `separation.progress` events."""

    def __init__(self, broker: Any, job_id: str, interval_s: float, target: str | None = None) -> None:
        self._broker = broker
        self._job_id = job_id
        self._target = target
        self._throttle = Throttle(interval_s)
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Future[Any]] = set()

    def report(self, fraction: float) -> None:
        # Completion is its own event; anything else at most once per interval.
        if fraction >= 1.0 or not self._throttle.ready():
            return
        event = make_event(
            SEPARATION_PROGRESS,
            SeparationProgress(job_id=self._job_id, target=self._target, percent=round(100.0 * fraction, 1)),
            source=SOURCE,
        )
        future = asyncio.run_coroutine_threadsafe(self._publish(event), self._loop)
        self._tasks.add(future)  # type: ignore[arg-type]
        future.add_done_callback(self._tasks.discard)  # type: ignore[arg-type]

    async def _publish(self, event: Event[Any]) -> None:
        try:
            await self._broker.publish(event)
        except Exception as exc:
            log.debug("progress event dropped: %s", exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*(asyncio.wrap_future(t) for t in list(self._tasks)), return_exceptions=True)
