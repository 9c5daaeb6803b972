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


class Worker:
    """Thread work that runs until `release` is set, and a log of what ended when."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.log: list[str] = []

    def work(self) -> None:
        self.started.set()
        self.release.wait()
        self.log.append("thread ended")
        # What a stopped worker raises (dropped: the caller was cancelled).
        raise RuntimeError("stopped early")

    async def caller(self, stop: threading.Event | None) -> None:
        try:
            await to_thread_settled(self.work, stop=stop)
        finally:
            self.log.append("caller ended")

    async def running(self, stop: threading.Event | None = None) -> asyncio.Task[None]:
        task = asyncio.create_task(self.caller(stop))
        await asyncio.to_thread(self.started.wait)
        return task


async def test_a_cancelled_caller_stops_the_work_and_waits_for_the_thread() -> None:
    worker = Worker()
    task = await worker.running(stop=worker.release)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert worker.release.is_set()
    assert worker.log == ["thread ended", "caller ended"]


async def test_work_that_cannot_be_stopped_is_waited_for_even_when_cancelled_twice() -> None:
    worker = Worker()
    task = await worker.running()
    for _ in range(2):
        task.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
    # Both cancellations were delivered, and the caller still waits for the thread.
    assert not task.done() and worker.log == []
    worker.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert worker.log == ["thread ended", "caller ended"]
