"""A batch through the running services: one request, several songs, followed on one WebSocket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import websockets

from stemflow_dev import demo_song
from stemflow_dev.client import StemflowClient
from stemflow_shared.auth import ApiKeys

pytestmark = pytest.mark.integration
TERMINAL = {"stemflow.job.completed.v1", "stemflow.job.failed.v1", "stemflow.job.cancelled.v1"}


async def test_a_batch_is_submitted_at_once_and_followed_on_one_websocket(
    client: StemflowClient, system: Any, api_key: str, tmp_path: Path, mongo_db: Any
) -> None:
    songs = [demo_song.write(tmp_path / f"b{i}.wav", seconds=3.0, seed=300 + i) for i in range(2)]
    files = [("file", (p.name, p.read_bytes(), "audio/wav")) for p in songs]
    answer = await client.http.post("/v1/batches", files=files, data={"stems": "2", "quality": "fast"})
    assert answer.status_code == 202, answer.text
    batch = answer.json()
    job_ids = [j["id"] for j in batch["jobs"]]

    headers = {"Authorization": f"Bearer {api_key}"}
    ended: dict[str, str] = {}
    async with websockets.connect(batch["links"]["events"], additional_headers=headers) as ws:
        first = json.loads(await ws.recv())
        assert first["type"] == "subscribed" and first["batch_id"] == batch["id"]
        assert [j["id"] for j in first["jobs"]] == job_ids

        async def until_all_ended() -> None:
            while len(ended) < len(job_ids):
                frame = json.loads(await ws.recv())
                for event in frame.get("events", []):
                    assert event["subject"] in job_ids and event["data"]["batch_id"] == batch["id"]
                    if event["type"] in TERMINAL:
                        ended[event["subject"]] = event["type"]

        # Jobs that ended before the subscription show it in the first frame already.
        for job in first["jobs"]:
            if job["status"] in ("completed", "failed", "cancelled"):
                ended[job["id"]] = f"stemflow.job.{job['status']}.v1"
        await asyncio.wait_for(until_all_ended(), 300)
    assert set(ended.values()) == {"stemflow.job.completed.v1"}

    done = (await client.http.get(f"/v1/batches/{batch['id']}")).json()
    assert done["status"] == "completed" and done["counts"] == {"completed": 2} and done["progress"] == 100.0

    # Another owner cannot follow it.
    other = await ApiKeys(mongo_db).create("batch-intruder")
    async with websockets.connect(system.events_url, additional_headers={"Authorization": f"Bearer {other}"}) as ws:
        await ws.send(json.dumps({"type": "subscribe", "batch_id": batch["id"]}))
        refused = json.loads(await ws.recv())
        assert refused["type"] == "error" and refused["code"] == "batch_not_found"
