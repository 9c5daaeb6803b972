"""What a client sees of a job event: no owner, no blob keys, the rest of the CloudEvent as it was."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio

from notifier.public import public_envelope, public_json
from stemflow_shared.events import (
    JOB_COMPLETED,
    JOB_PROGRESS,
    JobCompleted,
    JobProgressed,
    Progress,
    StemInfo,
    make_event,
)


def stem(name: str) -> StemInfo:
    return StemInfo(
        name=name, format="wav", media_type="audio/wav", blob_key=f"jobs/j1/stems/{name}.wav", size=10, duration_s=1.0
    )


def test_a_completed_job_event_loses_its_owner_and_blob_keys_and_gains_stem_paths() -> None:
    data = JobCompleted(job_id="j1", owner="alice-internal-id", stems=[stem("vocals"), stem("drums & bass")])
    event = make_event(JOB_COMPLETED, data, source="gateway")
    public = json.loads(public_json(event.envelope))
    original = json.loads(event.envelope.to_json())
    text = json.dumps(public)
    assert "alice-internal-id" not in text and "blob_key" not in text and "stems/vocals.wav" not in text
    assert [s["path"] for s in public["data"]["stems"]] == [
        "/v1/jobs/j1/stems/vocals",
        "/v1/jobs/j1/stems/drums%20%26%20bass",
    ]
    # Everything else is the CloudEvent as published.
    assert {k: v for k, v in public.items() if k != "data"} == {k: v for k, v in original.items() if k != "data"}
    for kept, full in zip(public["data"]["stems"], original["data"]["stems"], strict=True):
        assert {k: v for k, v in kept.items() if k != "path"} == {k: v for k, v in full.items() if k != "blob_key"}
    assert public["data"]["job_id"] == "j1"


def test_a_progress_event_loses_only_its_owner() -> None:
    event = make_event(
        JOB_PROGRESS,
        JobProgressed(job_id="j2", owner="bob", status="processing", progress=Progress()),
        source="gateway",
    )
    public = public_envelope(event.envelope)
    assert "owner" not in public.data
    assert public.data == {k: v for k, v in event.envelope.data.items() if k != "owner"}
    assert event.envelope.data["owner"] == "bob"  # the original is left alone (the hub routes on it)


HEAD_TIMEOUT_S = 1.0


@pytest_asyncio.fixture(scope="module")
async def notifier(kit: Any, notifier_env: dict[str, str]) -> AsyncIterator[Any]:
    async with kit.running_notifier(
        notifier_env, replica_id=kit.replica("public"), http_head_timeout_s=HEAD_TIMEOUT_S
    ) as running:
        yield running


async def test_an_unknown_path_is_a_problem_and_slow_clients_are_cut(notifier: Any) -> None:
    async with httpx.AsyncClient(base_url=notifier.http_url) as http:
        missing = await http.get("/nope")
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
        assert missing.json()["code"] == "not_found"
        assert (await http.get("/docs")).status_code == 404  # no API documentation to learn from
    reader, writer = await asyncio.open_connection("127.0.0.1", notifier.port)
    try:
        writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: n\r\nUpgrade: webs")  # half a head, then nothing
        answer = await asyncio.wait_for(reader.read(), HEAD_TIMEOUT_S + 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
