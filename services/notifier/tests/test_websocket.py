"""The WebSocket contract on a real notifier: auth, tenancy, initial state, unsubscribe, keep-alive and idle."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus


@pytest_asyncio.fixture(scope="module")
async def notifier(kit: Any, notifier_env: dict[str, str]) -> AsyncIterator[Any]:
    async with kit.running_notifier(notifier_env, replica_id=kit.replica("ws")) as running:
        yield running


async def test_a_missing_or_wrong_key_is_refused_with_401(kit: Any, notifier: Any) -> None:
    for key in (None, "sfk_wrong", "not-a-key"):
        with pytest.raises(InvalidStatus) as refused:
            async with kit.connect(notifier.url, key):
                pass
        response = refused.value.response
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert json.loads(response.body)["code"] == "unauthorized"


async def test_the_key_may_come_as_a_token_query_parameter(kit: Any, notifier: Any, feed: Any) -> None:
    key = await feed.key("token-owner")
    async with websockets.connect(f"{notifier.url}?token={key}") as ws:
        assert (await kit.subscribe(ws))["type"] == "subscribed"


async def test_a_browser_sends_the_key_as_a_subprotocol_and_gets_the_plain_one_back(
    kit: Any, notifier: Any, feed: Any
) -> None:
    key = await feed.key("browser-owner")
    offered = ["stemflow", f"stemflow.bearer.{key}"]
    async with websockets.connect(notifier.url, subprotocols=offered) as ws:  # type: ignore[arg-type]
        # The answer names the plain subprotocol: the key is never echoed back.
        assert ws.subprotocol == "stemflow"
        assert ws.response is not None and ws.response.headers["Sec-WebSocket-Protocol"] == "stemflow"
        assert (await kit.subscribe(ws))["type"] == "subscribed"
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(notifier.url, subprotocols=["stemflow", "stemflow.bearer.sfk_wrong"]):  # type: ignore[list-item]
            pass
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["code"] == "unauthorized"


async def test_subscribing_sends_the_jobs_current_state_first(kit: Any, notifier: Any, feed: Any) -> None:
    key = await feed.key("alice")
    job = await feed.job("alice")
    async with kit.connect(notifier.url, key) as ws:
        reply = await kit.subscribe(ws, job_id=job)
        assert reply["type"] == "subscribed" and reply["job_id"] == job
        state = reply["state"]
        assert state["id"] == job and state["status"] == "processing"
        assert state["progress"]["overall"] == 10.0
        assert state["progress"]["separation"] == {"status": "running", "percent": 10.0}
        # The job document as the gateway renders it for GET /v1/jobs/{id}, not a copy of its own.
        jobs = feed.gateway.state.jobs
        assert state == jobs.view(await jobs.repo.get(job))
        event = await feed.progress("alice", job, 42.0)
        (received,) = await kit.events_until(ws, event.id)
        assert received["data"]["progress"]["overall"] == 42.0


async def test_subscribing_to_all_jobs_sends_the_state_of_the_unfinished_ones_first(
    kit: Any, notifier: Any, feed: Any
) -> None:
    key = await feed.key("gina")
    unfinished = [await feed.job("gina", status=status) for status in ("queued", "ingesting", "processing")]
    for status in ("completed", "failed", "cancelled"):
        await feed.job("gina", status=status)
    await feed.job("not-gina")
    async with kit.connect(notifier.url, key) as ws:
        reply = await kit.subscribe(ws)
        assert reply["type"] == "subscribed" and reply["job_id"] is None
        assert [state["id"] for state in reply["jobs"]] == sorted(unfinished, reverse=True)
        assert {state["id"]: state["status"] for state in reply["jobs"]} == dict(
            zip(unfinished, ("queued", "ingesting", "processing"), strict=True)
        )
        event = await feed.progress("gina", unfinished[0], 30.0)
        assert [e["id"] for e in await kit.events_until(ws, event.id)] == [event.id]
    async with kit.connect(notifier.url, await feed.key("nobody-yet")) as ws:
        assert await kit.subscribe(ws) == {"type": "subscribed", "job_id": None}


async def test_a_job_id_in_the_url_subscribes_at_once(kit: Any, notifier: Any, feed: Any) -> None:
    key = await feed.key("alice")
    job = await feed.job("alice")
    async with kit.connect(f"{notifier.url}?job_id={job}", key) as ws:
        reply = await kit.receive(ws)
        assert reply["type"] == "subscribed" and reply["state"]["id"] == job


async def test_a_key_never_sees_another_owners_jobs_or_events(kit: Any, notifier: Any, feed: Any) -> None:
    victim_job = await feed.job("victim")
    intruder_job = await feed.job("intruder")
    intruder = await feed.key("intruder")
    async with kit.connect(notifier.url, intruder) as ws:
        refused = await kit.subscribe(ws, job_id=victim_job, last_event_id="anything")
        assert refused == {"type": "error", "code": "job_not_found", "message": "no such job", "job_id": victim_job}
        assert (await kit.subscribe(ws))["type"] == "subscribed"
        await feed.progress("victim", victim_job, 50.0)
        await feed.completed("victim", victim_job)
        sentinel = await feed.completed("intruder", intruder_job)
        events = await kit.events_until(ws, sentinel.id)
        assert [e["id"] for e in events] == [sentinel.id]


async def test_after_unsubscribing_no_more_events_of_that_job_arrive(kit: Any, notifier: Any, feed: Any) -> None:
    key = await feed.key("bob")
    job, other = await feed.job("bob"), await feed.job("bob")
    async with kit.connect(notifier.url, key) as ws:
        await kit.subscribe(ws, job_id=job)
        await kit.subscribe(ws, job_id=other)
        first = await feed.progress("bob", job, 20.0)
        assert [e["id"] for e in await kit.events_until(ws, first.id)] == [first.id]
        await ws.send(json.dumps({"type": "unsubscribe", "job_id": job}))
        assert await kit.receive(ws) == {"type": "unsubscribed", "job_id": job}
        await feed.completed("bob", job)
        sentinel = await feed.completed("bob", other)
        assert [e["id"] for e in await kit.events_until(ws, sentinel.id)] == [sentinel.id]


async def test_unsubscribing_from_all_jobs_stops_their_events(kit: Any, notifier: Any, feed: Any) -> None:
    key = await feed.key("hank")
    job, kept = await feed.job("hank"), await feed.job("hank")
    async with kit.connect(notifier.url, key) as ws:
        await kit.subscribe(ws)
        await kit.subscribe(ws, job_id=kept)
        await ws.send(json.dumps({"type": "unsubscribe"}))
        assert await kit.receive(ws) == {"type": "unsubscribed", "job_id": None}
        await feed.completed("hank", job)
        sentinel = await feed.completed("hank", kept)
        assert [e["id"] for e in await kit.events_until(ws, sentinel.id)] == [sentinel.id]


async def test_bad_messages_get_an_error_and_the_connection_stays(kit: Any, notifier: Any, feed: Any) -> None:
    key = await feed.key("carol")
    async with kit.connect(notifier.url, key) as ws:
        for raw, code in (
            ("not json", "malformed_message"),
            ("[1, 2]", "malformed_message"),
            ('{"type": "dance"}', "unknown_message"),
            ('{"type": "subscribe", "job_id": "../etc"}', "invalid_job_id"),
            ('{"type": "subscribe", "last_event_id": 7}', "invalid_last_event_id"),
        ):
            await ws.send(raw)
            reply = await kit.receive(ws)
            assert reply["type"] == "error" and reply["code"] == code, raw
        await ws.send(json.dumps({"type": "ping"}))
        assert await kit.receive(ws) == {"type": "pong"}


async def test_a_message_over_the_size_limit_closes_with_1009(kit: Any, notifier: Any, feed: Any) -> None:
    key = await feed.key("chatty")
    async with kit.connect(notifier.url, key) as ws:
        await ws.send(json.dumps({"type": "ping", "padding": "x" * 70_000}))
        with pytest.raises(ConnectionClosed) as closed:
            await kit.receive(ws)
        assert closed.value.rcvd.code == 1009


async def test_a_revoked_key_is_closed_with_4401_on_its_next_subscribe(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    """Revoked at the gateway; with no cache of keys in the notifier, the next subscribe finds it."""
    key = await feed.key("dave")
    async with (
        kit.running_notifier(notifier_env, replica_id=kit.replica("revoke"), principal_cache_ttl_s=0) as notifier,
        kit.connect(notifier.url, key) as ws,
    ):
        assert (await kit.subscribe(ws))["type"] == "subscribed"
        await feed.revoke(key)
        await ws.send(json.dumps({"type": "subscribe"}))
        with pytest.raises(ConnectionClosed) as closed:
            await kit.receive(ws)
        assert closed.value.rcvd.code == 4401


async def test_a_connects_key_lookup_serves_its_subscribes_for_the_cache_time(
    kit: Any, notifier: Any, feed: Any
) -> None:
    """The gateway is asked once per key per PRINCIPAL_CACHE_TTL_S (10 s): a key revoked after the connect
    still subscribes within that time, the connect's answer being reused (the test above: with no cache, it
    is closed)."""
    key = await feed.key("cached")
    async with kit.connect(notifier.url, key) as ws:
        await feed.revoke(key)
        assert (await kit.subscribe(ws))["type"] == "subscribed"


async def test_an_idle_connection_is_closed_with_4000_and_pongs_do_not_count(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    key = await feed.key("erin")
    settings = {"idle_timeout_s": 1.0, "ping_interval_s": 0.2, "ping_timeout_s": 5.0}
    async with (
        kit.running_notifier(notifier_env, replica_id=kit.replica("idle"), **settings) as notifier,
        kit.connect(notifier.url, key) as ws,
    ):
        with pytest.raises(ConnectionClosed) as closed:
            await kit.receive(ws)
        assert closed.value.rcvd.code == 4000


async def test_a_peer_that_never_answers_pings_is_dropped_with_1011(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    key = await feed.key("frank")
    settings = {"ping_interval_s": 0.2, "ping_timeout_s": 0.2}
    async with kit.running_notifier(notifier_env, replica_id=kit.replica("ping"), **settings) as notifier:
        reader, writer = await asyncio.open_connection("127.0.0.1", notifier.port)
        writer.write(
            (
                f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {key}\r\n\r\n"
            ).encode()
        )
        # Read everything the server sends, answering nothing, until it hangs up.
        received = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        head, _, data = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        frames = []
        while data:  # small unmasked server frames: opcode, 7-bit length, payload
            frames.append((data[0] & 0x0F, data[2 : 2 + (data[1] & 0x7F)]))
            data = data[2 + (data[1] & 0x7F) :]
        assert frames[0][0] == 0x9  # a ping first
        assert frames[-1][0] == 0x8 and int.from_bytes(frames[-1][1][:2], "big") == 1011
