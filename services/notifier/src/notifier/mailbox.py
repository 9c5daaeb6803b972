"""Per-connection batching: the pending events of one connection, released as batch frames.

A `Mailbox` holds one connection's pending events for up to one window (from
its first pending event), or until it has a full batch; a newer progress event of a job replaces the pending
one and moves to the end, so what is sent stays in stream order (a client's last
event id is always a valid resume point). A terminal event makes the batch due
at once. Past `max_pending`, progress events are shed first; terminal events
never are: a mailbox that cannot take one more is marked overflowed, and the
connection is closed so that the client resumes from Redis and loses nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from stemflow_shared import metrics
from stemflow_shared.events import JOB_PROGRESS, TERMINAL_JOB_EVENTS

TERMINAL_TYPES = frozenset(spec.type for spec in TERMINAL_JOB_EVENTS)
PROGRESS_TYPE = JOB_PROGRESS.type
Seq = tuple[int, int]


@dataclass(slots=True, frozen=True)
class Item:
    """One job event as the hub handles it: serialized once, shared by every recipient."""

    id: str
    owner: str
    job_id: str
    type: str
    json: str
    seq: Seq | None = None  # its position in the owner's resume stream, when logged

    @property
    def is_progress(self) -> bool:
        return self.type == PROGRESS_TYPE

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


class Mailbox:
    """Pending events of one connection, released in batches by time, count or urgency."""

    __slots__ = (
        "_due",
        "_loop",
        "_max_batch",
        "_max_pending",
        "_pending",
        "_timer",
        "_waiter",
        "_window",
        "_window_over",
        "overflowed",
    )

    def __init__(self, window_s: float, max_batch: int, max_pending: int) -> None:
        self._window = window_s
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._pending: dict[Any, Item] = {}
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._due = False
        self._window_over = False
        self.overflowed = False

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def max_pending(self) -> int:
        return self._max_pending

    def push(self, item: Item) -> None:
        if item.is_progress:
            key: Any = ("progress", item.job_id)
            if self._pending.pop(key, None) is not None:
                metrics.WS_EVENTS_COALESCED.inc()
        else:
            key = item.id
        self._pending[key] = item
        if len(self._pending) > self._max_pending:
            self._shed()
        if self._timer is None and not self._window_over and self._window > 0:
            self._timer = self._loop.call_later(self._window, self._end_window)
        if self.overflowed or item.is_terminal or len(self._pending) >= self._max_batch or self._window <= 0:
            self._make_due()

    def overflow(self) -> None:
        """Give up on this connection: wake the sender so that it closes it."""
        self.overflowed = True
        self._make_due()

    def discard(self, keep: Any) -> None:
        """Drop pending events of jobs for which `keep(job_id)` is false (after an unsubscribe)."""
        for key in [k for k, item in self._pending.items() if not keep(item.job_id)]:
            del self._pending[key]

    def _shed(self) -> None:
        for key in [k for k, item in self._pending.items() if item.is_progress]:
            del self._pending[key]
            metrics.WS_EVENTS_COALESCED.inc()
            if len(self._pending) <= self._max_pending:
                return
        self.overflowed = True

    def _end_window(self) -> None:
        self._timer = None
        self._window_over = True
        self._make_due()

    def _make_due(self) -> None:
        self._due = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_batch(self) -> list[Item]:
        """Wait until a batch is due, then take at most `max_batch` events, oldest first."""
        while not self._due:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if len(self._pending) <= self._max_batch:
            batch = list(self._pending.values())
            self._pending.clear()
        else:
            keys = [k for k, _ in zip(self._pending, range(self._max_batch), strict=False)]
            batch = [self._pending.pop(k) for k in keys]
        if not self._pending:
            self.close()
            self._due = self._window_over = False
        elif not (self._window_over or self.overflowed or len(self._pending) >= self._max_batch or self._window <= 0):
            # What a full batch left behind waits for the rest of its window, unless it is urgent.
            self._due = any(item.is_terminal for item in self._pending.values())
        metrics.WS_BATCH_SIZE.observe(len(batch))
        return batch

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
