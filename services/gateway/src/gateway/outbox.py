"""The outbox relay: publishes the events pending in job documents, then removes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from stemflow_shared import telemetry
from stemflow_shared.events import JOB_SUBMITTED

from .lifecycle import utcnow
from .repository import JobRepository, event_from_entry

log = logging.getLogger(__name__)

# How many event ids `published_here` remembers: far more than are published between a job.submitted's
# publish and its return through the gateway's own queue.
PUBLISHED_HERE_MAX = 4096


class OutboxRelay:
    """Publishes a job's pending events in order; a sweeper picks up what a crash left behind."""

    def __init__(self, repo: JobRepository, broker: Any, *, delay_s: float = 0.0) -> None:
        self._repo = repo
        self._broker = broker
        # A test/ops knob: widens the window between the database write and the publish.
        self._delay_s = delay_s
        # One lock per job while anyone flushes it, with the number of flushes holding or awaiting it.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._background: set[asyncio.Task[None]] = set()
        # Ids of the events this process published lately, oldest first (a bounded, insertion-ordered dict).
        self._published_here: dict[str, None] = {}

    def published_here(self, event_id: str) -> bool:
        """Whether this process published that `job.submitted` lately: its return through the gateway's own
        queue needs no work (the broker consumer acks it unread: `Broker.consume(own_events=...)`)."""
        return event_id in self._published_here

    def _remember_published(self, event_id: str) -> None:
        self._published_here[event_id] = None
        if len(self._published_here) > PUBLISHED_HERE_MAX:
            del self._published_here[next(iter(self._published_here))]

    async def flush(self, job_id: str, entries: Sequence[dict[str, Any]] | None = None) -> int:
        """Publish every pending event of a job (with confirms), oldest first.

        `entries`: the job's outbox as its writer just stored it (a new job's), which saves reading it back.
        """
        lock, users = self._locks.get(job_id) or (asyncio.Lock(), 0)
        self._locks[job_id] = (lock, users + 1)
        try:
            async with lock:
                if entries is None:
                    entries = await self._repo.pending_events(job_id)
                published: list[str] = []
                try:
                    for entry in entries:
                        event = event_from_entry(entry)
                        if event.spec is JOB_SUBMITTED:
                            # Before the publish: the event may come back before its confirm does.
                            self._remember_published(entry["id"])
                        await self._broker.publish(event)
                        published.append(entry["id"])
                finally:
                    if published:
                        # The outbox's bookkeeping: in a traced job's trace, the publish's span says it went out.
                        with telemetry.no_client_spans():
                            await self._repo.mark_published(job_id, published)
                return len(published)
        finally:
            lock, users = self._locks[job_id]
            if users == 1:
                del self._locks[job_id]
            else:
                self._locks[job_id] = (lock, users - 1)

    def flush_soon(self, job_id: str, entries: Sequence[dict[str, Any]] | None = None) -> None:
        """Flush in the background (the HTTP answer does not wait for the broker)."""
        task = asyncio.create_task(self._flush_logged(job_id, entries))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _flush_logged(self, job_id: str, entries: Sequence[dict[str, Any]] | None) -> None:
        try:
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
                entries = None  # the delay is there to let the sweeper or a crash act: read what is left
            await self.flush(job_id, entries)
        except Exception as exc:
            log.warning("outbox flush of %s failed, the sweeper will retry: %s", job_id, exc)

    async def sweep(self, older_than: timedelta) -> int:
        """Publish events that have been pending longer than `older_than` (left by a crash or an outage)."""
        count = 0
        for job_id in await self._repo.jobs_with_pending_events(utcnow() - older_than):
            count += await self.flush(job_id)
        return count

    async def drain(self, timeout_s: float) -> None:
        if self._background:
            with contextlib.suppress(Exception):
                await asyncio.wait(self._background, timeout=timeout_s)
