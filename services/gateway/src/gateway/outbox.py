"""The outbox relay: publishes the events pending in job documents, then removes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

from .lifecycle import utcnow
from .repository import JobRepository, event_from_entry

log = logging.getLogger(__name__)


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

    async def flush(self, job_id: str) -> int:
        """Publish every pending event of a job (with confirms), oldest first."""
        lock, users = self._locks.get(job_id) or (asyncio.Lock(), 0)
        self._locks[job_id] = (lock, users + 1)
        try:
            async with lock:
                entries = await self._repo.pending_events(job_id)
                published: list[str] = []
                try:
                    for entry in entries:
                        await self._broker.publish(event_from_entry(entry))
                        published.append(entry["id"])
                finally:
                    if published:
                        await self._repo.mark_published(job_id, published)
                return len(published)
        finally:
            lock, users = self._locks[job_id]
            if users == 1:
                del self._locks[job_id]
            else:
                self._locks[job_id] = (lock, users - 1)

    def flush_soon(self, job_id: str) -> None:
        """Flush in the background (the HTTP answer does not wait for the broker)."""
        task = asyncio.create_task(self._flush_logged(job_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _flush_logged(self, job_id: str) -> None:
        try:
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            await self.flush(job_id)
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
