"""Batching on a real notifier: frames counted, progress coalesced, terminal events flushed at once."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from notifier.public import public_json


@pytest_asyncio.fixture(scope="module")
async def endless_window(kit: Any, notifier_env: dict[str, str]) -> AsyncIterator[Any]:
    """A notifier whose window never ends: only a terminal event or a full batch sends a frame."""
    settings = {"batch_window_ms": 3_600_000, "batch_max_events": 5}
    async with kit.running_notifier(notifier_env, replica_id=kit.replica("batching"), **settings) as running:
        yield running


async def test_progress_collapses_and_a_terminal_event_flushes_the_batch_as_one_frame(
    kit: Any, endless_window: Any, feed: Any
) -> None:
    key = await feed.key("batcher")
    one, two = await feed.job("batcher"), await feed.job("batcher")
    async with kit.connect(endless_window.url, key) as ws:
        await kit.subscribe(ws)
        published = []
        for percent in range(1, 21):
            published.append(await feed.progress("batcher", one, percent))
            published.append(await feed.progress("batcher", two, percent))
        done = await feed.completed("batcher", one)
        frames: list[dict[str, Any]] = []
        events = await kit.events_until(ws, done.id, frames)
        assert len(frames) == 1 and frames[0]["type"] == "batch"
        assert [e["id"] for e in events] == [published[-2].id, published[-1].id, done.id]
        assert [e["data"]["progress"]["overall"] for e in events[:2]] == [20.0, 20.0]


async def test_a_full_batch_is_sent_without_waiting(kit: Any, endless_window: Any, feed: Any) -> None:
    key = await feed.key("bulk")
    jobs = [await feed.job("bulk") for _ in range(7)]
    async with kit.connect(endless_window.url, key) as ws:
        await kit.subscribe(ws)
        progress = [await feed.progress("bulk", job, 50.0) for job in jobs]
        frame = await kit.receive(ws)
        assert [e["id"] for e in frame["events"]] == [e.id for e in progress[:5]]
        # The two left wait for company; a terminal event takes them along.
        done = await feed.failed("bulk", jobs[0])
        frame = await kit.receive(ws)
        assert [e["id"] for e in frame["events"]] == [progress[5].id, progress[6].id, done.id]


async def test_every_terminal_kind_flushes_and_keeps_its_payload(kit: Any, endless_window: Any, feed: Any) -> None:
    key = await feed.key("kinds")
    job = await feed.job("kinds")
    async with kit.connect(endless_window.url, key) as ws:
        await kit.subscribe(ws, job_id=job)
        for publish in (feed.completed, feed.failed, feed.cancelled):
            event = await publish("kinds", job)
            frame = await kit.receive(ws)
            (received,) = frame["events"]
            assert received == json.loads(public_json(event.envelope))
            assert "owner" not in received["data"] and received["data"]["job_id"] == job


async def test_with_a_short_window_progress_alone_is_sent_when_the_window_ends(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    key = await feed.key("window")
    job = await feed.job("window")
    async with (
        kit.running_notifier(notifier_env, replica_id=kit.replica("window"), batch_window_ms=50) as notifier,
        kit.connect(notifier.url, key) as ws,
    ):
        await kit.subscribe(ws, job_id=job)
        event = await feed.progress("window", job, 5.0)
        assert [e["id"] for e in (await kit.receive(ws))["events"]] == [event.id]
