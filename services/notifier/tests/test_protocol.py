"""permessage-deflate for large frames only, and the bytes counted on the wire."""

from __future__ import annotations

import json
from typing import Any

from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from notifier.protocol import LargeFrameDeflate
from stemflow_shared.metrics import REGISTRY


def batch(n: int) -> bytes:
    events = [{"id": f"event-{i}", "type": "stemflow.job.progress.v1", "data": {"overall": i}} for i in range(n)]
    return json.dumps({"type": "batch", "events": events}).encode()


def test_small_frames_go_uncompressed_and_large_ones_compressed_in_one_consistent_stream() -> None:
    server = LargeFrameDeflate(PerMessageDeflate(True, False, 12, 12, {"memLevel": 5}), min_size=1024)
    client = PerMessageDeflate(False, True, 12, 12)
    assert "encoder" not in vars(server)  # no zlib state until a large frame needs it
    for payload in (batch(2), batch(40), batch(1), batch(40), batch(60)):
        sent = server.encode(Frame(Opcode.TEXT, payload))
        if len(payload) < 1024:
            assert not sent.rsv1 and sent.data == payload
        else:
            assert sent.rsv1 and len(sent.data) < len(payload) / 3
        assert client.decode(sent).data == payload


def test_without_context_takeover_each_large_frame_stands_alone() -> None:
    server = LargeFrameDeflate(PerMessageDeflate(True, True, 12, 12, {"memLevel": 5}), min_size=1024)
    for payload in (batch(40), batch(50)):
        client = PerMessageDeflate(True, True, 12, 12)  # a fresh decoder each time: no shared history
        assert client.decode(server.encode(Frame(Opcode.TEXT, payload))).data == payload
    assert "encoder" not in vars(server)


async def test_a_large_batch_is_compressed_on_the_wire_and_a_small_one_is_not(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    key = await feed.key("squeezed")
    job = await feed.job("squeezed")
    async with (
        kit.running_notifier(notifier_env, replica_id=kit.replica("deflate")) as notifier,
        kit.connect(notifier.url, key, max_size=None) as ws,
    ):
        assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
        await kit.subscribe(ws, job_id=job)
        for publish, compressed in (
            (lambda: feed.progress("squeezed", job, 1.0), False),
            (lambda: feed.completed("squeezed", job, beats=4000), True),
        ):
            before = REGISTRY.get_sample_value("stemflow_ws_bytes_sent_total")
            event = await publish()
            frame = await ws.recv()
            assert json.loads(frame)["events"][0]["id"] == event.id
            wire = REGISTRY.get_sample_value("stemflow_ws_bytes_sent_total") - before
            if compressed:
                assert wire < len(frame) / 2
            else:
                assert len(frame) < wire <= len(frame) + 4
