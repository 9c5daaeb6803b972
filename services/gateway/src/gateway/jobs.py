"""The gateway's job use cases, shared by the HTTP routes and the event handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

from stemflow_shared import metrics, telemetry
from stemflow_shared.cancellation import cancel_flag_key
from stemflow_shared.events import (
    AUDIO_INGESTED,
    JOB_COMPLETED,
    JOB_SUBMITTED,
    SEPARATION_FAILED,
    TERMINAL_JOB_STATUSES,
    ErrorInfo,
    Event,
    InputRef,
    JobCompleted,
    JobOptions,
    JobSubmitted,
    StageFailed,
    make_event,
)
from stemflow_shared.messaging import PermanentError
from stemflow_shared.reuse import ResultIndex, SeparationSummary
from stemflow_shared.storage import BlobInfo, job_prefix

from . import lifecycle, views
from .cache import CachedJob, CachedPage, JobCache
from .outbox import OutboxRelay
from .problems import Problem
from .ratelimit import COUNTER_TTL_S
from .repository import IdempotencyConflict, JobRepository

if TYPE_CHECKING:
    from .models import ModelCatalogue

log = logging.getLogger(__name__)
UNFINISHED = ("queued", "ingesting", "processing")


class Jobs:
    def __init__(
        self,
        repo: JobRepository,
        cache: JobCache,
        relay: OutboxRelay,
        blobs: Any,
        redis: Any,
        *,
        redis_prefix: str,
        base_url: str,
        events_url: str,
        retention: timedelta,
        results: ResultIndex | None = None,
        models: ModelCatalogue,
    ) -> None:
        self.repo = repo
        self.cache = cache
        self.relay = relay
        self.blobs = blobs
        self._redis = redis
        self._redis_prefix = redis_prefix
        self._base_url = base_url.rstrip("/")
        self._events_url = events_url
        self._retention = retention
        self._results = results
        self.models = models

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def events_url(self) -> str:
        return self._events_url

    def job_url(self, job_id: str) -> str:
        return f"{self._base_url}/v1/jobs/{job_id}"

    def view(self, doc: dict[str, Any]) -> dict[str, Any]:
        return views.public_job(doc, self._base_url, self._events_url)

    def render(self, doc: dict[str, Any]) -> bytes:
        return orjson.dumps(self.view(doc))

    async def remember(self, doc: dict[str, Any]) -> tuple[bytes, bytes]:
        """Render a job and cache it (never over a newer version); its JSON and gzip (or empty) bodies."""
        body = self.render(doc)
        return body, await self.cache.put(doc["_id"], doc["owner"], doc["version"], body)

    async def cached_page(
        self,
        owner: str,
        *,
        status: str | None,
        limit: int,
        after: str | None,
        gzip_ok: bool,
        counter_key: str | None,
    ) -> tuple[CachedPage, int]:
        """The owner's cached page (or a miss, with the generation to keep it under) and the request count."""
        return await self.cache.page(
            owner,
            _page_variant(status, limit, after),
            gzip_ok=gzip_ok,
            counter_key=counter_key,
            counter_ttl_s=COUNTER_TTL_S,
        )

    async def list_page(
        self,
        owner: str,
        *,
        status: str | None,
        limit: int,
        after: str | None,
        gzip_ok: bool = False,
        generation: bytes | None = None,
    ) -> tuple[bytes, bool]:
        """A page of the owner's jobs as JSON, and whether that is its gzip form.

        Ids and versions come from the index alone; each item is the job cache's body when it holds that
        version, else rendered from one projected query (and cached): nothing is decoded twice or validated.
        A page read under a list `generation` is cached (with its gzip form) unless a job changed since.
        """
        versions, next_cursor = await self.repo.page_versions(owner, status=status, limit=limit, after=after)
        bodies = await self.cache.bodies(versions)
        missing = [job_id for (job_id, _), body in zip(versions, bodies, strict=True) if body is None]
        if missing:
            found = await self.repo.list_items(missing)  # one deleted meanwhile is left out of the page
            rendered = {doc["_id"]: self.render(doc) for doc in found}
            await self.cache.fill([(doc, rendered[doc["_id"]]) for doc in found])
            bodies = [body or rendered.get(job_id) for (job_id, _), body in zip(versions, bodies, strict=True)]
        items = b",".join(body for body in bodies if body)
        page = b'{"items":[' + items + b'],"next_cursor":' + orjson.dumps(next_cursor) + b"}"
        if generation is None:
            return page, False
        compressed = await self.cache.keep_page(owner, _page_variant(status, limit, after), generation, page)
        return (compressed, True) if gzip_ok and compressed else (page, False)

    async def submit_once(
        self,
        job_id: str,
        owner: str,
        options: JobOptions,
        input_ref: InputRef,
        *,
        idempotency_key: str | None,
        request_fingerprint: str | None,
    ) -> dict[str, Any]:
        """Submit the job, or return the job its Idempotency-Key made before (whatever that request was)."""
        if idempotency_key is not None:
            earlier = await self.repo.find_by_idempotency_key(owner, idempotency_key)
            if earlier is not None:
                metrics.DEDUP_HITS.labels("idempotency_key").inc()
                return earlier
        try:
            return await self.submit(
                job_id,
                owner,
                options,
                input_ref,
                idempotency_key=idempotency_key,
                request_fingerprint=request_fingerprint,
            )
        except IdempotencyConflict as conflict:  # another request with the key won the race
            metrics.DEDUP_HITS.labels("idempotency_key").inc()
            return conflict.job

    async def submit_batch_once(
        self,
        batch_id: str,
        owner: str,
        options: JobOptions,
        inputs: list[tuple[str, InputRef]],
        *,
        idempotency_key: str | None,
        request_fingerprint: str | None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Submit the batch and its jobs, or return the batch its Idempotency-Key made before, with its jobs."""
        earlier = None
        if idempotency_key is not None:
            earlier = await self.repo.find_batch_by_idempotency_key(owner, idempotency_key)
        if earlier is None:
            try:
                return await self.submit_batch(
                    batch_id,
                    owner,
                    options,
                    inputs,
                    idempotency_key=idempotency_key,
                    request_fingerprint=request_fingerprint,
                )
            except IdempotencyConflict as conflict:
                earlier = conflict.job
        metrics.DEDUP_HITS.labels("idempotency_key").inc()
        return earlier, await self.repo.batch_jobs(earlier["_id"])

    async def batch(self, batch_id: str, owner: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """One of the owner's batches with its jobs (None: no such batch for this owner)."""
        found = await self.repo.get_batch(batch_id, owner)
        return None if found is None else (found, in_submission_order(found, await self.repo.batch_jobs(batch_id)))

    async def read_cached(self, job_id: str, *, gzip_ok: bool, counter_key: str | None) -> tuple[CachedJob | None, int]:
        """The cached job (any owner's: the caller checks) and the caller's request count, in one Redis call."""
        return await self.cache.get(job_id, gzip_ok=gzip_ok, counter_key=counter_key, counter_ttl_s=COUNTER_TTL_S)

    async def read(self, job_id: str, owner: str, *, gzip_ok: bool) -> CachedJob | None:
        """The owner's job read from MongoDB, rendered and cached on the way."""
        doc = await self.repo.get(job_id, owner)
        if doc is None:
            return None
        body, compressed = await self.remember(doc)
        if gzip_ok and compressed:
            return CachedJob(owner, doc["version"], compressed, True)
        return CachedJob(owner, doc["version"], body, False)

    async def document(self, job_id: str, owner: str) -> dict[str, Any] | None:
        """The owner's job document (None: no such job for this owner)."""
        return await self.repo.get(job_id, owner)

    async def blob_size(self, key: str) -> int:
        """The size of a result file (BlobNotFound when it is gone)."""
        return await self.blobs.size(key)

    def blob_chunks(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """A result file's bytes [start, end), streamed."""
        return self.blobs.read(key, start, end)

    async def store_upload(self, key: str, chunks: AsyncIterator[bytes], max_bytes: int) -> BlobInfo:
        """Stream an upload into the blob store (TooLarge past `max_bytes`), hashing it on the way."""
        return await self.blobs.put_stream(key, chunks, max_bytes=max_bytes)

    async def discard_uploads(self, keys: list[str]) -> None:
        for key in keys:
            await self.blobs.delete_prefix(key)

    async def submit(
        self,
        job_id: str,
        owner: str,
        options: JobOptions,
        input_ref: InputRef,
        *,
        idempotency_key: str | None = None,
        request_fingerprint: str | None = None,
        batch_id: str | None = None,
    ) -> dict[str, Any]:
        """Insert the job with its `job.submitted` in the outbox, then publish in the background."""
        if batch_id is None:  # a batch checked its options once, before its first job
            await self.models.require_served(options)
        now = lifecycle.utcnow()
        input_doc = input_ref.model_dump(mode="json", exclude_none=True)
        doc = lifecycle.new_job(
            job_id,
            owner,
            options,
            input_doc,
            now=now,
            retention=self._retention,
            idempotency_key=idempotency_key,
            request_fingerprint=request_fingerprint,
            batch_id=batch_id,
        )
        event = make_event(
            JOB_SUBMITTED,
            JobSubmitted(job_id=job_id, owner=owner, options=options, input=input_ref),
            source=lifecycle.SOURCE,
        )
        doc = await self.repo.insert(doc, [event])
        metrics.JOBS_SUBMITTED.labels("upload" if input_ref.blob_key else "url").inc()
        self.relay.flush_soon(job_id, doc["outbox"])
        with telemetry.no_client_spans():  # the cache's copy: the insert's span is the job's write
            await self.remember(doc)
        return doc

    async def submit_batch(
        self,
        batch_id: str,
        owner: str,
        options: JobOptions,
        inputs: list[tuple[str, InputRef]],
        *,
        idempotency_key: str | None = None,
        request_fingerprint: str | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A batch document naming its jobs, then each job (the batch first, so no job is ever orphaned).

        Raises IdempotencyConflict with the earlier batch when its Idempotency-Key was used before.
        """
        await self.models.require_served(options)
        now = lifecycle.utcnow()
        batch = {
            "_id": batch_id,
            "owner": owner,
            "job_ids": [job_id for job_id, _ in inputs],
            "options": options.model_dump(mode="json"),
            "created_at": now,
            "expire_at": now + self._retention,
        }
        if idempotency_key is not None:
            batch.update(idempotency_key=idempotency_key, request_fingerprint=request_fingerprint)
        await self.repo.insert_batch(batch)
        docs = [await self.submit(job_id, owner, options, ref, batch_id=batch_id) for job_id, ref in inputs]
        return batch, docs

    async def adopt_external(self, event: Event[JobSubmitted]) -> None:
        """Create the job of a `job.submitted` another service published (no-op for our own)."""
        data = event.data
        if self.relay.published_here(event.id) or await self.repo.get(data.job_id) is not None:
            return
        doc = lifecycle.new_job(
            data.job_id,
            data.owner,
            data.options,
            data.input.model_dump(mode="json", exclude_none=True),
            now=lifecycle.utcnow(),
            retention=self._retention,
        )
        if await self.repo.upsert_external(doc, []):
            metrics.JOBS_SUBMITTED.labels("event").inc()
            await self.remember(doc)  # a new job of the owner's: the owner's cached list pages go
        try:
            await self.models.require_served(data.options)
        except Problem as refused:
            # Nothing would ever take its separation: it ends now, as a refused HTTP submission would.
            failed = StageFailed(job_id=data.job_id, error=ErrorInfo(code=refused.code, message=refused.detail))
            await self.apply_event(make_event(SEPARATION_FAILED, failed, source=lifecycle.SOURCE))

    async def apply_event(self, event: Event[Any]) -> bool:
        """Apply a stage event; publish what it causes before the message is acked. Whether it changed the job."""
        job_id = event.data.job_id
        queue = await self._queue_place(event)
        doc, change = await self.repo.transition(
            job_id, lambda d: lifecycle.apply(d, event, lifecycle.utcnow(), queue=queue), lifecycle.utcnow()
        )
        if doc is None:
            raise PermanentError("job_unknown", f"no job {job_id}")
        if change is not None:
            await self._after_change(doc, change)
        else:
            # A redelivery after a crash between the write and the cache update repairs the cache.
            await self.remember(doc)
        # Also flushes what an earlier delivery left pending if it crashed after its write.
        await self.relay.flush(job_id)
        return change is not None

    async def _queue_place(self, event: Event[Any]) -> dict[str, Any] | None:
        """Where newly ingested work stands in its model's queue: jobs ahead and an estimated start."""
        if event.spec is not AUDIO_INGESTED or event.data.reused or not event.data.options.separate:
            return None
        try:
            estimate = await self.models.estimate(event.data.options.model)
        except RedisError as exc:
            log.warning("no queue estimate for job %s: %s", event.data.job_id, exc)
            return None
        ahead = max(estimate.queue_depth - 1, 0)  # its own work is in the queue too, unless already taken
        place: dict[str, Any] = {"ahead": ahead}
        if estimate.estimated_wait_s is not None:
            per_job = estimate.estimated_wait_s / estimate.queue_depth if estimate.queue_depth else 0.0
            place["estimated_start_at"] = lifecycle.utcnow() + timedelta(seconds=round(per_job * ahead, 1))
        return place

    async def webhook_failed(self, job_id: str, error: ErrorInfo) -> bool:
        """Record on the job that its webhook could not be delivered (the job's own outcome stands)."""
        doc, _ = await self.repo.transition(
            job_id, lambda d: lifecycle.webhook_failed(d, error, lifecycle.utcnow()), lifecycle.utcnow()
        )
        if doc is not None:
            await self.remember(doc)
        return doc is not None

    async def _after_change(self, doc: dict[str, Any], change: lifecycle.Transition) -> None:
        await self.remember(doc)
        if change.status_changed:
            log.info("job %s is %s (%.0f%%)", doc["_id"], doc["status"], doc["progress"])
        if doc["status"] in TERMINAL_JOB_STATUSES:
            metrics.JOBS_FINISHED.labels(doc["status"]).inc()
            elapsed = (doc["updated_at"] - doc["created_at"]).total_seconds()
            metrics.JOB_DURATION.labels(doc["status"]).observe(max(elapsed, 0.0))
        for event in change.emit:
            if event.spec.name == JOB_COMPLETED.name:
                await self._index_results(doc, event.data)

    async def _index_results(self, doc: dict[str, Any], completed: JobCompleted) -> None:
        """Let ingest reuse a finished job's results for the same audio and options (best effort)."""
        fingerprint = (doc.get("audio") or {}).get("fingerprint")
        if self._results is None or not fingerprint:
            return
        try:
            how = (doc.get("result") or {}).get("separation")
            summary = SeparationSummary.model_validate(how) if how else None
            await self._results.remember(fingerprint, JobOptions.model_validate(doc["options"]), completed, summary)
        except RedisError as exc:
            log.warning("could not index the results of job %s for reuse: %s", doc["_id"], exc)

    async def _forget_results(self, doc: dict[str, Any]) -> None:
        """Drop the reuse entry that points at this job's blobs, which are about to be deleted."""
        fingerprint = (doc.get("audio") or {}).get("fingerprint")
        if self._results is None or not fingerprint:
            return
        options = JobOptions.model_validate(doc["options"])
        try:
            indexed = await self._results.lookup(fingerprint, options)
            if indexed is not None and indexed.job_id == doc["_id"]:
                await self._results.forget(fingerprint, options)
        except RedisError as exc:
            log.warning("could not drop the reuse entry of job %s: %s", doc["_id"], exc)

    async def cancel(self, job_id: str, owner: str) -> dict[str, Any] | None:
        """Cancel a running job; returns the job (unchanged when it had already ended) or None."""
        if await self.repo.get(job_id, owner) is None:
            return None
        await self._flag_cancelled(job_id)
        doc, change = await self.repo.transition(
            job_id, lambda d: lifecycle.cancel(d, lifecycle.utcnow()), lifecycle.utcnow()
        )
        if doc is not None and change is not None:
            await self._after_change(doc, change)
            self.relay.flush_soon(job_id)
        elif doc is not None:
            await self.remember(doc)  # a retried cancel repairs what a crash after the write left stale
        return doc

    async def _flag_cancelled(self, job_id: str) -> None:
        """Tell the workers to stop (they poll the flag between segments). Best effort: with Redis down the
        job still ends now, and whatever a worker publishes later finds a terminal job and changes nothing."""
        try:
            await self._redis.set(
                cancel_flag_key(self._redis_prefix, job_id), b"1", ex=int(self._retention.total_seconds())
            )
        except RedisError as exc:
            log.warning("could not flag job %s as cancelled for the workers: %s", job_id, exc)

    async def delete(self, job_id: str, owner: str | None) -> bool:
        """Delete a job and every blob it has; a running job is cancelled first."""
        doc = await self.repo.get(job_id, owner)
        if doc is None:
            return False
        if doc["status"] not in TERMINAL_JOB_STATUSES:
            await self.cancel(job_id, doc["owner"])
            await self.relay.flush(job_id)
        await self._forget_results(doc)
        removed = await self.blobs.delete_prefix(job_prefix(job_id))
        deleted = await self.repo.delete(job_id, owner)
        await self.cache.bury(job_id, doc["owner"])
        log.info("deleted job %s and %d blobs", job_id, removed)
        return deleted

    async def time_out_stuck(self, timeout_s: float) -> int:
        """Fail the unfinished jobs that have not changed for `timeout_s`; workers still on them are told to stop."""
        now = lifecycle.utcnow()
        count = 0
        for job_id in await self.repo.unchanged_since(UNFINISHED, now - timedelta(seconds=timeout_s)):
            doc, change = await self.repo.transition(
                job_id, lambda d: lifecycle.time_out(d, lifecycle.utcnow(), timeout_s), lifecycle.utcnow()
            )
            if doc is None or change is None:
                continue  # it moved (or ended) since the query
            await self._flag_cancelled(job_id)
            await self._after_change(doc, change)
            await self.relay.flush(job_id)
            stage = lifecycle.stalled_stage(doc)
            metrics.JOBS_TIMED_OUT.labels(stage).inc()
            log.warning("job %s made no progress in its %s stage for %.0f s: failed", job_id, stage, timeout_s)
            count += 1
        return count

    async def sample_unfinished(self) -> int:
        """Set the gauges of unfinished jobs per status (count, longest time without change)."""
        now = lifecycle.utcnow()
        for status, (count, oldest) in (await self.repo.unfinished_summary(UNFINISHED)).items():
            metrics.JOBS_ACTIVE.labels(status).set(count)
            age = (now - oldest).total_seconds() if oldest is not None else 0.0
            metrics.JOBS_OLDEST_UNCHANGED.labels(status).set(max(age, 0.0))
        return 0

    async def collect_expired(self) -> int:
        count = 0
        for job_id in await self.repo.expired(lifecycle.utcnow()):
            count += await self.delete(job_id, None)
        return count


def _page_variant(status: str | None, limit: int, after: str | None) -> str:
    """Which page of an owner's: its status filter, its length and the job it starts after ('' for the first)."""
    return f"{status or ''}:{limit}:{after or ''}"


def in_submission_order(batch: dict[str, Any], docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch's jobs in the order they were sent: the batch's own list (ids made in one millisecond do not
    sort by creation)."""
    order = {job_id: i for i, job_id in enumerate(batch.get("job_ids") or ())}
    return sorted(docs, key=lambda doc: order.get(doc["_id"], len(order)))
