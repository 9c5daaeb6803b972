"""Clients that do not keep up: closed (4008, or dropped when they read nothing at all), and they still get
every terminal event by resuming."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

BEATS = 20_000  # about 200 KB an event: 40 of them are more than the socket buffers hold


async def flood_a_slow_client(kit: Any, notifier: Any, feed: Any, owner: str) -> tuple[ConnectionClosed, list, list]:
    """Terminal events for 40 jobs to a client that reads one message and stops, and to a fast one.

    Returns how the slow client's connection ended, the events it got before and after resuming, and the
    terminal events published.
    """
    key = await feed.key(owner)
    jobs = [await feed.job(owner) for _ in range(40)]
    # A tiny receive buffer, no compression, and the client library stops reading after one message.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", notifier.port))
    async with (
        kit.connect(
            notifier.url, key, sock=sock, max_queue=1, max_size=None, ping_interval=None, compression=None
        ) as slow,
        # The fast client's library reads all the time (no flow control), though the test reads it only after
        # publishing: with its default queue of 16 frames it stopped reading on a slow machine, and the notifier
        # dropped it as stalled too.
        kit.connect(notifier.url, key, max_size=None, max_queue=None) as fast,
    ):
        await kit.subscribe(slow)
        await kit.subscribe(fast)
        terminal = []
        for job in jobs:
            await feed.progress(owner, job, 50.0)
            terminal.append(await feed.completed(owner, job, beats=BEATS))
        # The fast client has them all, so the slow one's mailbox has been offered them all too.
        await kit.events_until(fast, terminal[-1].id)
        received = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                received.extend(json.loads(await slow.recv()).get("events", []))
    assert received, "the slow client got some events before it was closed"
    async with kit.connect(notifier.url, key, max_size=None) as again:
        reply = await kit.subscribe(again, last_event_id=received[-1]["id"])
        assert (reply["type"], reply["job_id"], reply["resumed"]) == ("subscribed", None, True)
        received.extend(await kit.events_until(again, terminal[-1].id))
    return closed.value, received, terminal


def assert_every_terminal_event_once(received: list[dict[str, Any]], terminal: list[Any]) -> None:
    got = [e["id"] for e in received if e["type"] == "stemflow.job.completed.v1"]
    assert got == [e.id for e in terminal]
    assert len({e["id"] for e in received}) == len(received)


async def test_a_slow_client_is_closed_with_4008_and_resumes_without_losing_a_terminal_event(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    settings = {"client_queue_max": 4, "send_timeout_s": 300.0, "ping_interval_s": 300.0}
    async with kit.running_notifier(notifier_env, replica_id=kit.replica("slow"), **settings) as notifier:
        closed, received, terminal = await flood_a_slow_client(kit, notifier, feed, "slowpoke")
    assert closed.rcvd is not None and closed.rcvd.code == 4008
    assert_every_terminal_event_once(received, terminal)


async def test_a_client_that_reads_nothing_is_dropped_after_the_send_timeout_and_loses_nothing(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    settings = {"client_queue_max": 1000, "send_timeout_s": 0.5, "ping_interval_s": 300.0}
    # Less than the events sent: the client's socket stays full, whatever the kernel would allow.
    async with kit.running_notifier(
        notifier_env, send_buffer=256 * 1024, replica_id=kit.replica("stuck"), **settings
    ) as notifier:
        closed, received, terminal = await flood_a_slow_client(kit, notifier, feed, "stuck")
    assert closed.rcvd is None  # no close frame could reach it: the connection was cut (1006)
    assert_every_terminal_event_once(received, terminal)
