"""The outbox relay: publishes the events pending in job documents, then removes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

from .repository import JobRepository, event_from_entry
from .state import utcnow

log = logging.getLogger(__name__)


class OutboxRelay:
    """Publishes a job's pending events in order; a sweeper picks up what a crash left behind."""

    def __init__(self, repo: JobRepository, broker: Any, on_published: Any = None, *, delay_s: float = 0.0) -> None:
        self._repo = repo
        self._broker = broker
        # A test/ops knob: widens the window between the database write and the publish.
        self._delay_s = delay_s
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._on_published = on_published

    async def flush(self, job_id: str) -> int:
        """Publish every pending event of a job (with confirms), oldest first."""
        lock = self._locks.setdefault(job_id, asyncio.Lock())
        try:
            async with lock:
                entries = await self._repo.pending_events(job_id)
                published: list[str] = []
                try:
                    for entry in entries:
                        event = event_from_entry(entry)
                        await self._broker.publish(event)
                        published.append(entry["id"])
                        if self._on_published is not None:
                            self._on_published(event)
                finally:
                    if published:
                        await self._repo.mark_published(job_id, published)
                return len(published)
        finally:
            if not lock.locked() and not lock._waiters:  # type: ignore[attr-defined]
                self._locks.pop(job_id, None)

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
