"""From the broker to the hub: job events logged for resume first, then dispatched, in arrival order.

Handlers run concurrently (the consumer's prefetch), but each submits its event
before its first await, so submissions keep the queue's order. Events that
arrive while a Redis round trip is under way go together in the next one.
An event is dispatched only after it is in the resume stream, which is what
lets a resuming client merge the replay with live events without a gap. When
Redis fails, events are still dispatched and the handlers fail, so the broker
redelivers them for logging (the hub drops the second dispatch).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from .hub import Hub
from .mailbox import Item
from .resume import EventLog

log = logging.getLogger(__name__)


class Relay:
    def __init__(self, event_log: EventLog, hub: Hub) -> None:
        self._log = event_log
        self._hub = hub
        self._queue: list[tuple[Item, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: Item) -> asyncio.Future[None]:
        """Queue an event; the future is done once it is logged and dispatched."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            items = [item for item, _ in batch]
            error: Exception | None = None
            try:
                seqs = await self._log.append(items)
                items = [dataclasses.replace(item, seq=seq) for item, seq in zip(items, seqs, strict=True)]
            except Exception as exc:
                log.warning("could not log %d events for resume: %s", len(items), exc)
                error = exc
            for item in items:
                try:
                    self._hub.dispatch(item)
                except Exception:  # a bug here must not stall the queue: log it, keep going
                    log.exception("dispatching event %s failed", item.id)
            for _, future in batch:
                if future.done():
                    continue
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
