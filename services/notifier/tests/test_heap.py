"""Garbage collection with thousands of WebSockets: survivors frozen, nothing cyclic left behind by a connection,
every event still delivered in order to many clients."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from notifier.protocol import NotifierWebSocketProtocol
from notifier.session import Session
from stemflow_shared.httpserver import LimitedHttpToolsProtocol

# The policy is process-wide: it is tried in a process of its own, not in the test run's.
FREEZING = """
import gc, json
from notifier.heap import freeze_survivors
gc.collect()
gc.freeze()
freeze_survivors()
frozen = gc.get_freeze_count()
kept = [[i] for i in range(200_000)]  # long-lived: they outlive every collection their allocation sets off
for _ in range(100_000):  # cycles that die young
    cycle = []
    cycle.append(cycle)
del cycle
print(json.dumps({"frozen": gc.get_freeze_count() - frozen, "old": len(gc.get_objects(2)), "kept": len(kept)}))
"""

STARTING = """
import gc, json, uvicorn
def run(server):
    print(json.dumps({"frozen": gc.get_freeze_count(), "callback": any(getattr(c, "__module__", "") == "notifier.heap" for c in gc.callbacks)}))
uvicorn.Server.run = run
from notifier.main import main
main()
"""


def _python(code: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **(env or {})}, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_what_survives_a_middle_collection_is_frozen_and_the_old_generation_stays_empty() -> None:
    state = _python(FREEZING)
    # The long-lived lists went to the permanent generation as automatic collections found them alive ...
    assert state["frozen"] >= 0.9 * state["kept"]
    # ... so the oldest generation, which a full collection walks, holds next to nothing
    assert state["old"] < 0.01 * state["kept"]
    # and cycles that died young were collected, not frozen
    assert state["frozen"] < state["kept"] + 10_000


def test_the_service_freezes_its_start_up_objects_and_then_survivors(notifier_env: dict[str, str]) -> None:
    state = _python(STARTING, {**notifier_env, "HTTP_PORT": "0"})
    assert state["frozen"] > 0
    assert state["callback"] is True


@pytest_asyncio.fixture(scope="module")
async def notifier(kit: Any, notifier_env: dict[str, str]) -> AsyncIterator[Any]:
    async with kit.running_notifier(notifier_env, replica_id=kit.replica("heap"), batch_window_ms=0) as running:
        yield running


SERVER_SIDE = (LimitedHttpToolsProtocol, NotifierWebSocketProtocol, Session)


def _server_side(objects: list[Any], server_state: Any) -> dict[str, int]:
    """The notifier's objects by type name; of the shared HTTP protocol, only the ones of this server's
    connections (other tests' servers use it too)."""
    counts: dict[str, int] = {}
    for obj in objects:
        # By type, never isinstance: the heap of a whole test run holds weak proxies of dead objects, which raise.
        kind = type(obj)
        if issubclass(kind, LimitedHttpToolsProtocol) and obj.server_state is not server_state:
            continue
        module = getattr(kind, "__module__", None)
        if issubclass(kind, SERVER_SIDE) or str(module).startswith("notifier.") or kind.__name__ == "WebSocket":
            counts[kind.__name__] = counts.get(kind.__name__, 0) + 1
    return counts


async def _until_closed_on_the_server(notifier: Any) -> None:
    """Each connection's task has ended and its protocol is gone from the server (it learns of a close from its
    transport, which has no event to wait on: polled, for at most 20 s)."""
    state = notifier.server.server_state
    if state.tasks:
        await asyncio.wait(set(state.tasks), timeout=20)
    for _ in range(1000):
        if not (len(notifier.app.state.hub) or state.connections or state.tasks):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the server still holds connections")


async def test_a_closed_connection_leaves_nothing_behind_for_the_cyclic_collector(
    kit: Any, notifier: Any, feed: Any
) -> None:
    key, job = await feed.key("heap-owner"), await feed.job("heap-owner")
    gc.collect()
    state = notifier.server.server_state
    before = _server_side(gc.get_objects(), state)
    gc.disable()
    try:
        for percent in range(10, 60, 10):
            async with kit.connect(notifier.url, key) as ws:
                assert (await kit.subscribe(ws))["type"] == "subscribed"
                assert (await kit.subscribe(ws, job_id=job))["type"] == "subscribed"
                event = await feed.progress("heap-owner", job, float(percent))
                assert [e["id"] for e in await kit.events_until(ws, event.id)][-1] == event.id
        await _until_closed_on_the_server(notifier)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = _server_side(gc.garbage, state)
        garbage = {id(obj) for obj in gc.garbage}
        alive = _server_side([obj for obj in gc.get_objects() if id(obj) not in garbage], state)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == {}, "a closed connection left cycles that a frozen heap would keep forever"
    assert alive == before, "a closed connection's objects outlived it"


async def test_many_clients_each_get_every_terminal_event_and_the_stream_in_order(
    kit: Any, notifier: Any, feed: Any
) -> None:
    owner = "heap-crowd"
    key, jobs = await feed.key(owner), [await feed.job(owner) for _ in range(3)]
    clients = [await kit.connect(notifier.url, key).__aenter__() for _ in range(150)]
    try:
        for i, ws in enumerate(clients):
            reply = await (kit.subscribe(ws) if i % 2 else kit.subscribe(ws, job_id=jobs[i % 3]))
            assert reply["type"] == "subscribed"
        published: list[Any] = []
        for percent in (20.0, 40.0, 60.0, 80.0):
            for job in jobs:
                published.append(await feed.progress(owner, job, percent))
        for job, finish in zip(jobs, (feed.completed, feed.failed, feed.cancelled), strict=True):
            published.append(await finish(owner, job))
        order = {event.id: n for n, event in enumerate(published)}
        for i, ws in enumerate(clients):
            wanted = jobs if i % 2 else [jobs[i % 3]]
            last = [e for e in published if e.data.job_id in wanted][-1]
            got = [e["id"] for e in await kit.events_until(ws, last.id) if e["data"]["job_id"] in wanted]
            assert [order[i] for i in got] == sorted(order[i] for i in got), "out of order"
            for job in wanted:  # a job's progress may be coalesced, never its last progress or its end
                theirs = [e.id for e in published if e.data.job_id == job]
                assert theirs[-2:] == [i for i in got if i in theirs][-2:]
    finally:
        await asyncio.gather(*(ws.close() for ws in clients))
