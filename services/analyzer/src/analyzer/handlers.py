"""`audio.ingested` or `analysis.requested` in, `analysis.completed` (or `.failed`) out; the work runs in warm
processes.

A job that separates is analysed once its stems exist: the gateway asks with `analysis.requested` (the
mix and the stems), so the job never completes on a reading the stems would have changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
from opentelemetry import trace

from stemflow_shared import metrics, telemetry
from stemflow_shared.cancellation import is_cancelled
from stemflow_shared.events import (
    ANALYSIS_COMPLETED,
    ANALYSIS_FAILED,
    ANALYSIS_REQUESTED,
    AUDIO_INGESTED,
    AnalysisCompleted,
    AnalysisRequested,
    AnalysisResult,
    AudioIngested,
    ErrorInfo,
    Event,
    EventSpec,
    StageFailed,
    event_id,
    make_event,
)
from stemflow_shared.messaging import Handler
from stemflow_shared.storage import BlobNotFound

from .features import Step, analyze, warm_up

log = logging.getLogger(__name__)
SOURCE = "/stemflow/analyzer"


def start_worker() -> None:
    """Process initialiser: one thread per process, and every code path compiled before the first job."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    warm_up()


def analyze_file(path: str, stems: dict[str, str] | None = None) -> tuple[dict[str, Any], list[Step]]:
    """Runs in a worker process: read the normalised audio (and the stems at `stems`' paths, by name) and
    measure it; the facts and the steps' times."""
    steps: list[Step] = []
    samples, sr = sf.read(path, dtype="float32", always_2d=True)
    separated = {name: _stem_samples(stem, sr, samples.shape[0]) for name, stem in (stems or {}).items()}
    facts = dataclasses.asdict(analyze(samples.T.copy(), sr, steps, separated or None))
    return facts, steps


def _stem_samples(path: str, sr: int, frames: int) -> np.ndarray:
    """A stem as (channels, frames) at the mix's rate and length (stems may be written at another rate)."""
    stem, stem_sr = sf.read(path, dtype="float32", always_2d=True)
    if stem_sr != sr:
        stem = soxr.resample(stem, stem_sr, sr)
    stem = stem[:frames]
    return np.ascontiguousarray(np.pad(stem, ((0, frames - stem.shape[0]), (0, 0))).T)


def record_steps(steps: list[Step], duration_s: float) -> None:
    """The worker process's steps as `analysis.<step>` spans under the current (consumer) span."""
    if not trace.get_current_span().get_span_context().is_valid:
        return  # tracing is off
    for name, start, end in steps:
        span = telemetry.tracer().start_span(f"analysis.{name}", start_time=start)
        span.set_attribute("stemflow.audio.duration_s", duration_s)
        span.end(end_time=end)


class Analyzer:
    def __init__(self, pool: ProcessPoolExecutor, blobs: Any, redis: Any, settings: Any) -> None:
        self._pool = pool
        self._blobs = blobs
        self._redis = redis
        self._settings = settings

    def handlers(self) -> dict[EventSpec[Any], Handler]:
        return {AUDIO_INGESTED: self.on_ingested, ANALYSIS_REQUESTED: self.on_requested}

    async def on_ingested(self, event: Event[AudioIngested]) -> list[Event[Any]]:
        job = event.data
        if job.reused or not job.primary:
            # Reused: ingest publishes the earlier results itself. Not primary: one copy per separation target
            # of the same audio arrives; the primary one is analysed.
            return []
        if not job.options.analyze or job.options.separate:
            return []  # separating: the gateway asks again once the stems exist (`on_requested`)
        return await self._analyze(job.job_id, job.audio, [])

    async def on_requested(self, event: Event[AnalysisRequested]) -> list[Event[Any]]:
        return await self._analyze(event.data.job_id, event.data.audio, event.data.stems)

    async def _analyze(self, job_id: str, audio: Any, stems: list[Any]) -> list[Event[Any]]:
        """The mix (and its stems) measured in a worker process: `analysis.completed`, or `.failed`."""
        if await is_cancelled(self._redis, self._settings.redis_prefix, job_id):
            return []
        run = metrics.StageRun("analysis")
        loop = asyncio.get_running_loop()
        try:
            async with AsyncExitStack() as files:
                path = await files.enter_async_context(self._blobs.local_path(audio.blob_key))
                stem_paths = {
                    stem.name: str(await files.enter_async_context(self._blobs.local_path(stem.blob_key)))
                    for stem in stems
                }
                facts, steps = await loop.run_in_executor(self._pool, analyze_file, str(Path(path)), stem_paths)
            record_steps(steps, audio.duration_s)
            result = AnalysisResult(**facts, source="stems" if stems else "mix")
        except BlobNotFound:
            run.failed("audio_missing")
            return [self._failed(job_id, "audio_missing", "the normalised audio or a stem is gone")]
        except (ValueError, sf.LibsndfileError) as exc:
            run.failed("analysis_error")
            return [self._failed(job_id, "analysis_error", str(exc)[:500])]
        elapsed = run.completed(audio.duration_s)
        log.info(
            "analysed %.1f s of audio (%d stems) in %.2f s: %.1f BPM, %s",
            audio.duration_s,
            len(stems),
            elapsed,
            result.tempo_bpm,
            result.key,
        )
        data = AnalysisCompleted(job_id=job_id, analysis=result)
        return [make_event(ANALYSIS_COMPLETED, data, source=SOURCE, id=event_id(job_id, ANALYSIS_COMPLETED.name))]

    def _failed(self, job_id: str, code: str, message: str) -> Event[Any]:
        data = StageFailed(job_id=job_id, error=ErrorInfo(code=code, message=message))
        return make_event(ANALYSIS_FAILED, data, source=SOURCE, id=event_id(job_id, ANALYSIS_FAILED.name))
