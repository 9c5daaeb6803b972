"""Thread work under a caller that may be cancelled: the thread ends before the cancellation goes on."""

from __future__ import annotations

import asyncio
import threading

import pytest

from stemflow_shared.cancellation import to_thread_settled


async def test_the_result_and_the_error_of_the_thread_reach_the_caller() -> None:
    assert await to_thread_settled(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):
        await to_thread_settled(lambda: 1 / 0)


async def test_a_cancelled_caller_stops_the_work_and_waits_for_the_thread() -> None:
    started, stop = threading.Event(), threading.Event()
    log: list[str] = []

    def work() -> str:
        started.set()
        stop.wait()
        log.append("thread ended")
        raise RuntimeError("stopped early")  # what a stopped worker raises: dropped, the caller was cancelled

    async def caller() -> str:
        try:
            return await to_thread_settled(work, stop=stop)
        finally:
            log.append("caller cleans up")

    task = asyncio.create_task(caller())
    await asyncio.to_thread(started.wait)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stop.is_set()
    assert log == ["thread ended", "caller cleans up"]


async def test_work_that_cannot_be_stopped_is_waited_for_even_when_cancelled_twice() -> None:
    started, release = threading.Event(), threading.Event()
    log: list[str] = []

    def work() -> None:
        started.set()
        release.wait()
        log.append("thread ended")

    async def caller() -> None:
        try:
            await to_thread_settled(work)
        except asyncio.CancelledError:
            log.append("caller cancelled")
            raise

    task = asyncio.create_task(caller())
    await asyncio.to_thread(started.wait)
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    # Both cancellations were delivered, and the caller still waits for the thread.
    assert not task.done() and log == []
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["thread ended", "caller cancelled"]
