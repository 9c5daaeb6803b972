"""`job.submitted` in, `audio.ingested` or `ingest.failed` out."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from stemflow_shared import metrics, telemetry
from stemflow_shared.events import (
    AUDIO_INGESTED,
    INGEST_FAILED,
    JOB_SUBMITTED,
    AudioInfo,
    AudioIngested,
    ErrorInfo,
    Event,
    EventSpec,
    JobSubmitted,
    SourceInfo,
    StageFailed,
    event_id,
    make_event,
)
from stemflow_shared.idempotency import is_cancelled
from stemflow_shared.messaging import Handler
from stemflow_shared.storage import BlobNotFound, normalised_key

from .audio import AudioError, Limits, NormalisedAudio, normalise
from .fetch import fetch

log = logging.getLogger(__name__)
SOURCE = "/stemflow/ingest"


class Ingest:
    def __init__(self, blobs: Any, redis: Any, http: Any, settings: Any) -> None:
        self._blobs = blobs
        self._redis = redis
        self._http = http
        self._settings = settings
        self._limits = Limits(
            min_duration_s=settings.min_duration_s,
            max_duration_s=settings.max_duration_s,
            max_channels=settings.max_channels,
            min_sample_rate=settings.min_sample_rate,
            max_sample_rate=settings.max_sample_rate,
        )

    def handlers(self) -> dict[EventSpec[Any], Handler]:
        return {JOB_SUBMITTED: self.on_submitted}

    async def on_submitted(self, event: Event[JobSubmitted]) -> list[Event[Any]]:
        job = event.data
        if await is_cancelled(self._redis, self._settings.redis_prefix, job.job_id):
            log.info("job was cancelled before ingest")
            return []
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="stemflow-ingest-", dir=self._settings.work_dir) as tmp:
            dst = Path(tmp) / "normalised.wav"
            try:
                audio = await self._normalise(job, Path(tmp), dst)
            except AudioError as exc:
                metrics.STAGE_FAILURES.labels("ingest", exc.code).inc()
                metrics.STAGE_DURATION.labels("ingest", "", "failed").observe(time.perf_counter() - started)
                failed = StageFailed(job_id=job.job_id, error=ErrorInfo(code=exc.code, message=str(exc)))
                return [make_event(INGEST_FAILED, failed, source=SOURCE, id=event_id(job.job_id, INGEST_FAILED.name))]
            key = normalised_key(job.job_id)
            await self._blobs.put_file(key, dst)
        elapsed = time.perf_counter() - started
        log.info(
            "ingested %.1f s of %s audio (%d Hz, %d ch) in %.2f s",
            audio.duration_s,
            audio.source_format,
            audio.source_sample_rate,
            audio.source_channels,
            elapsed,
        )
        metrics.STAGE_DURATION.labels("ingest", "", "completed").observe(elapsed)
        metrics.AUDIO_SECONDS.labels("ingest").inc(audio.duration_s)
        metrics.REALTIME_FACTOR.labels("ingest").observe(audio.duration_s / max(elapsed, 1e-6))
        data = AudioIngested(
            job_id=job.job_id,
            owner=job.owner,
            options=job.options,
            audio=AudioInfo(
                blob_key=key,
                duration_s=audio.duration_s,
                sample_rate=audio.sample_rate,
                channels=audio.channels,
                frames=audio.frames,
                fingerprint=audio.sha256,
            ),
            source=SourceInfo(
                format=audio.source_format,
                sample_rate=audio.source_sample_rate,
                channels=audio.source_channels,
                duration_s=audio.duration_s,
            ),
        )
        return [make_event(AUDIO_INGESTED, data, source=SOURCE, id=event_id(job.job_id, AUDIO_INGESTED.name))]

    async def _normalise(self, job: JobSubmitted, tmp: Path, dst: Path) -> NormalisedAudio:
        options = job.options

        async def run(src: Path) -> NormalisedAudio:
            with telemetry.tracer().start_as_current_span("ingest.decode") as span:
                audio = await asyncio.to_thread(
                    normalise, src, dst, trim_start=options.trim_start, trim_end=options.trim_end, limits=self._limits
                )
                span.set_attributes(
                    {
                        "stemflow.audio.duration_s": audio.duration_s,
                        "stemflow.audio.source_format": audio.source_format,
                        "stemflow.audio.source_sample_rate": audio.source_sample_rate,
                        "stemflow.audio.source_channels": audio.source_channels,
                    }
                )
                return audio

        if job.input.blob_key is not None:
            try:
                async with self._blobs.local_path(job.input.blob_key) as src:
                    return await run(src)
            except BlobNotFound as exc:
                raise AudioError("upload_missing", "the uploaded file is gone") from exc
        src = tmp / "download"
        await fetch(
            job.input.source_url or "",
            src,
            client=self._http,
            max_bytes=self._settings.max_download_bytes,
            max_redirects=self._settings.max_redirects,
            allow_private=self._settings.allow_private_urls,
        )
        return await run(src)
