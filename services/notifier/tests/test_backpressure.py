"""A client that does not keep up: closed with 4008, and it still gets every terminal event by resuming."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

BEATS = 20_000  # about 200 KB an event: 40 of them are more than the socket buffers hold


async def test_a_slow_client_is_closed_with_4008_and_resumes_without_losing_a_terminal_event(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    key = await feed.key("slowpoke")
    jobs = [await feed.job("slowpoke") for _ in range(40)]
    settings = {"client_queue_max": 4, "send_timeout_s": 300.0, "ping_interval_s": 300.0}
    async with kit.running_notifier(notifier_env, replica_id=kit.replica("slow"), **settings) as notifier:
        # A tiny receive buffer, no compression, and the client library stops reading after one message.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", notifier.port))
        async with (
            kit.connect(
                notifier.url, key, sock=sock, max_queue=1, max_size=None, ping_interval=None, compression=None
            ) as slow,
            kit.connect(notifier.url, key, max_size=None) as fast,
        ):
            await kit.subscribe(slow)
            await kit.subscribe(fast)
            terminal = []
            for job in jobs:
                await feed.progress("slowpoke", job, 50.0)
                terminal.append(await feed.completed("slowpoke", job, beats=BEATS))
            # The fast client has them all, so the slow one's mailbox has been offered them all too.
            await kit.events_until(fast, terminal[-1].id)
            received = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    received.extend(json.loads(await slow.recv()).get("events", []))
            assert closed.value.rcvd.code == 4008
        assert received, "the slow client got some events before it was closed"
        async with kit.connect(notifier.url, key, max_size=None) as again:
            reply = await kit.subscribe(again, last_event_id=received[-1]["id"])
            assert reply == {"type": "subscribed", "job_id": None, "resumed": True}
            received.extend(await kit.events_until(again, terminal[-1].id))
    got = [e["id"] for e in received if e["type"] == "stemflow.job.completed.v1"]
    assert got == [e.id for e in terminal]
    assert len({e["id"] for e in received}) == len(received)
