"""Input taken in turns (notifier.protocol.Intake): what waits for a later turn is handled all the same, in order,
and clients leaving at once (close frames or lost connections) are all let go, leaving nothing behind."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from notifier.protocol import Intake, NotifierWebSocketProtocol
from notifier.session import Session

# A turn far shorter than handling one frame: all but the first input of each loop iteration waits for later turns.
TINY_TURN_MS = 0.0001


@pytest_asyncio.fixture(scope="module")
async def notifier(kit: Any, notifier_env: dict[str, str]) -> AsyncIterator[Any]:
    async with kit.running_notifier(
        notifier_env, replica_id=kit.replica("intake"), batch_window_ms=0, intake_turn_ms=TINY_TURN_MS
    ) as running:
        yield running


def intake(notifier: Any) -> Intake:
    intake = notifier.server.config.ws_protocol_class.keywords["intake"]
    assert isinstance(intake, Intake)
    return intake


async def test_input_that_waits_for_its_turn_is_answered_in_order(kit: Any, notifier: Any, feed: Any) -> None:
    owner = "intake-order"
    key, job = await feed.key(owner), await feed.job(owner)
    deferred = intake(notifier).deferred
    async with kit.connect(notifier.url, key) as ws, kit.connect(notifier.url, key) as other:
        # Many messages at once, from two clients: each gets its answers, in the order it asked.
        messages = [{"type": "ping"}] * 20 + [{"type": "subscribe", "job_id": job}] + [{"type": "ping"}] * 5
        for message in messages:
            await asyncio.gather(ws.send(json.dumps(message)), other.send(json.dumps({"type": "ping"})))
        answers = [(await kit.receive(ws))["type"] for _ in messages]
        assert answers == ["pong"] * 20 + ["subscribed"] + ["pong"] * 5
        assert [(await kit.receive(other))["type"] for _ in messages] == ["pong"] * len(messages)
        event = await feed.progress(owner, job, 30.0)
        assert [e["id"] for e in await kit.events_until(ws, event.id)] == [event.id]
    assert intake(notifier).deferred > deferred, "nothing waited for a later turn: the test tried nothing"


async def test_clients_leaving_at_once_are_all_let_go_and_leave_no_cycles(kit: Any, notifier: Any, feed: Any) -> None:
    owner = "intake-leaving"
    key, job = await feed.key(owner), await feed.job(owner)
    clients = [await kit.connect(notifier.url, key).__aenter__() for _ in range(60)]
    for i, ws in enumerate(clients):
        assert (await (kit.subscribe(ws) if i % 2 else kit.subscribe(ws, job_id=job)))["type"] == "subscribed"
    assert len(notifier.app.state.hub) == 60
    assert sum(type(obj) in SERVER_SIDE and _of(obj, notifier) for obj in gc.get_objects()) == 120
    gc.collect()
    deferred = intake(notifier).deferred
    gc.disable()
    try:
        # Half close with a close frame, half vanish (the server learns it from the lost connection), all at once.
        await asyncio.gather(*(ws.close() for ws in clients[::2]))
        for ws in clients[1::2]:
            ws.transport.abort()
        await _until_let_go(notifier)
        assert intake(notifier).deferred > deferred, "nothing waited for a later turn: the test tried nothing"
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = {type(obj).__name__ for obj in gc.garbage if type(obj) in SERVER_SIDE}
        alive = [obj for obj in gc.get_objects() if type(obj) in SERVER_SIDE and _of(obj, notifier)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == set(), "a connection that left made cycles that a frozen heap would keep for ever"
    assert alive == [], "a connection that left is still alive"
    assert len(intake(notifier)) == 0


SERVER_SIDE = (NotifierWebSocketProtocol, Session)


def _of(obj: Any, notifier: Any) -> bool:
    """Whether a protocol or session belongs to this test's server (other tests' servers run in this process)."""
    if type(obj) is NotifierWebSocketProtocol:
        return obj.connections is notifier.server.server_state.connections
    return obj._state is notifier.app.state


async def _until_let_go(notifier: Any) -> None:
    """Every connection's task has ended and the server holds none (polled, for at most 20 s: a close comes from
    the transport, which has no event to wait on)."""
    state = notifier.server.server_state
    for _ in range(1000):
        if not (len(notifier.app.state.hub) or state.connections or state.tasks):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the server still holds connections")
