"""`job.submitted` in, `audio.ingested` or `ingest.failed` out."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from redis.exceptions import RedisError

from stemflow_shared import metrics, telemetry
from stemflow_shared.cancellation import is_cancelled, to_thread_settled
from stemflow_shared.events import (
    ANALYSIS_COMPLETED,
    AUDIO_INGESTED,
    INGEST_FAILED,
    JOB_SUBMITTED,
    SEPARATION_COMPLETED,
    AnalysisCompleted,
    AudioInfo,
    AudioIngested,
    ErrorInfo,
    Event,
    EventSpec,
    JobSubmitted,
    SeparationCompleted,
    SourceInfo,
    StageFailed,
    StemInfo,
    event_id,
    make_event,
)
from stemflow_shared.messaging import Handler
from stemflow_shared.reuse import ResultIndex
from stemflow_shared.storage import BlobNotFound, normalised_key, stem_key

from .audio import AudioError, Limits, NormalisedAudio, normalise
from .fetch import fetch

log = logging.getLogger(__name__)
SOURCE = "/stemflow/ingest"
# Integer sample formats whose depth the stems keep (lossless outputs); anything else is float or lossy.
INTEGER_BITS = {"PCM_16": 16, "PCM_24": 24}


class Ingest:
    def __init__(self, blobs: Any, redis: Any, http: Any, settings: Any, results: ResultIndex | None = None) -> None:
        self._blobs = blobs
        self._results = results
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
        run = metrics.StageRun("ingest")
        with tempfile.TemporaryDirectory(prefix="stemflow-ingest-", dir=self._settings.work_dir) as tmp:
            dst = Path(tmp) / "normalised.wav"
            try:
                audio = await self._normalise(job, Path(tmp), dst)
            except AudioError as exc:
                run.failed(exc.code)
                failed = StageFailed(job_id=job.job_id, error=ErrorInfo(code=exc.code, message=str(exc)))
                return [make_event(INGEST_FAILED, failed, source=SOURCE, id=event_id(job.job_id, INGEST_FAILED.name))]
            info = self._audio_info(job, audio)
            # Stored even when the results are reused: later work on the job (practice mixes) reads it.
            await self._blobs.put_file(info.audio.blob_key, dst)
            reused = await self._reuse(job, info)
            if reused is not None:
                log.info("reused the results of an identical earlier job (%.1f s of audio)", audio.duration_s)
                return reused
        elapsed = run.completed(audio.duration_s)
        log.info(
            "ingested %.1f s of %s audio (%d Hz, %d ch) in %.2f s",
            audio.duration_s,
            audio.source_format,
            audio.source_sample_rate,
            audio.source_channels,
            elapsed,
        )
        return self._ingested_events(job, info)

    @staticmethod
    def _ingested_events(job: JobSubmitted, info: AudioIngested) -> list[Event[Any]]:
        """One `audio.ingested`; for a job with several targets one per target, each routed to its model."""
        options = job.options
        if not (options.targets and options.separate):
            return [make_event(AUDIO_INGESTED, info, source=SOURCE, id=event_id(job.job_id, AUDIO_INGESTED.name))]
        return [
            make_event(
                AUDIO_INGESTED,
                info.model_copy(
                    update={"options": options.for_target(target), "target": target.name, "primary": i == 0}
                ),
                source=SOURCE,
                id=event_id(job.job_id, AUDIO_INGESTED.name, target.name),
            )
            for i, target in enumerate(options.targets)
        ]

    def _audio_info(self, job: JobSubmitted, audio: NormalisedAudio) -> AudioIngested:
        return AudioIngested(
            job_id=job.job_id,
            owner=job.owner,
            options=job.options,
            audio=AudioInfo(
                blob_key=normalised_key(job.job_id),
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
                bits_per_sample=INTEGER_BITS.get(audio.source_subtype or ""),
            ),
        )

    async def _reuse(self, job: JobSubmitted, info: AudioIngested) -> list[Event[Any]] | None:
        """The events of an identical finished job's results, copied to this job; None on a miss.

        Same normalised audio (the fingerprint) and same result-shaping options: the stems are
        copied under this job (so deleting either job never breaks the other) and the stage
        results are published here, so the separator and analyzer skip the job (`reused`).
        """
        if self._results is None or job.options.targets:
            return None  # (several targets: each is computed; the index keys single separations)
        try:
            found = await self._results.lookup(info.audio.fingerprint, job.options)
        except RedisError as exc:
            log.warning("result index unavailable, computing afresh: %s", exc)
            found = None
        if found is None or found.job_id == job.job_id:
            metrics.CACHE_REQUESTS.labels("results", "miss").inc()
            return None
        previous = found.completed
        if job.options.separate and (found.separation is None or not previous.stems):
            metrics.CACHE_REQUESTS.labels("results", "miss").inc()
            return None
        if job.options.analyze and previous.analysis is None:
            metrics.CACHE_REQUESTS.labels("results", "miss").inc()
            return None
        stems: list[StemInfo] = []
        created: list[str] = []
        try:
            for stem in previous.stems if job.options.separate else ():
                extension = PurePosixPath(stem.blob_key).suffix.lstrip(".")
                key = stem_key(job.job_id, stem.name, extension)
                existed = await self._blobs.exists(key)
                async with self._blobs.local_path(stem.blob_key) as path:
                    copied = await self._blobs.put_file(key, Path(path))
                if not existed:
                    created.append(key)
                stems.append(stem.model_copy(update={"blob_key": key, "size": copied.size}))
        except BlobNotFound:
            # The earlier job was deleted under the index entry: compute afresh. Only the copies this attempt
            # created go: a redelivered job.submitted may find the stems its own separation already published.
            for key in created:
                await self._blobs.delete_prefix(key)
            metrics.CACHE_REQUESTS.labels("results", "stale").inc()
            return None
        metrics.CACHE_REQUESTS.labels("results", "hit").inc()
        job_id = job.job_id
        events: list[Event[Any]] = [
            make_event(
                AUDIO_INGESTED,
                info.model_copy(update={"reused": True}),
                source=SOURCE,
                id=event_id(job_id, AUDIO_INGESTED.name),
            )
        ]
        if job.options.separate and found.separation is not None:
            how = found.separation
            separated = SeparationCompleted(
                job_id=job_id,
                model=how.model,
                device=how.device,
                precision=how.precision,
                untrained=how.untrained,
                stems=stems,
                reconstruction_error_db=how.reconstruction_error_db,
            )
            events.append(
                make_event(SEPARATION_COMPLETED, separated, source=SOURCE, id=event_id(job_id, "separation.completed"))
            )
        if job.options.analyze and previous.analysis is not None:
            analysed = AnalysisCompleted(job_id=job_id, analysis=previous.analysis)
            events.append(
                make_event(ANALYSIS_COMPLETED, analysed, source=SOURCE, id=event_id(job_id, ANALYSIS_COMPLETED.name))
            )
        return events

    async def _normalise(self, job: JobSubmitted, tmp: Path, dst: Path) -> NormalisedAudio:
        options = job.options

        async def run(src: Path) -> NormalisedAudio:
            with telemetry.tracer().start_as_current_span("ingest.decode") as span:
                # Cancelled (the broker connection lost): the decode ends before its folder is removed.
                audio = await to_thread_settled(
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
