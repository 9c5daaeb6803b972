"""Cancellation: the flags the gateway sets in Redis when a job is cancelled, which workers check between steps;
and thread work that ends before a cancelled caller goes on."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def cancel_flag_key(prefix: str, job_id: str) -> str:
    """Redis key the gateway sets when a job is cancelled; workers check it between steps."""
    return f"{prefix}cancel:{job_id}"


async def is_cancelled(redis: Any, prefix: str, job_id: str) -> bool:
    return bool(await redis.exists(cancel_flag_key(prefix, job_id)))


async def to_thread_settled(
    func: Callable[..., T], /, *args: Any, stop: threading.Event | None = None, **kwargs: Any
) -> T:
    """`asyncio.to_thread`, except that a cancelled caller does not leave the thread running behind it.

    A thread cannot be interrupted: cancelling `asyncio.to_thread` ends the await while the work goes on,
    still writing into the caller's temporary files as the caller removes them, and using the CPU (or the
    GPU) for a result nobody reads; a broker connection lost mid-job cancels its handler exactly so. Here
    the cancellation sets `stop` (for work that polls it), waits for the thread to end, and only then goes
    on, so the caller's cleanup runs after the thread is done. What the thread raised or returned then is
    dropped; the cancellation is what the caller gets.
    """
    work = asyncio.ensure_future(asyncio.to_thread(func, *args, **kwargs))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if stop is not None:
            stop.set()
        while not work.done():
            # A second cancellation changes nothing: the thread still has to end first.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({work})
        if not work.cancelled():
            work.exception()  # retrieved, so asyncio does not log it as never retrieved
        raise
