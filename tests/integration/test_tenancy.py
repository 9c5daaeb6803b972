"""Nobody reaches what is not theirs: every route and the WebSocket, with a second owner's key."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import soundfile as sf
import websockets

from stemflow_dev import demo_song
from stemflow_dev.client import StemflowClient
from stemflow_shared.auth import ApiKeys

pytestmark = pytest.mark.integration


@pytest.fixture
async def finished_job(client: StemflowClient, tmp_path: Path) -> dict[str, Any]:
    song = tmp_path / "mine.wav"
    sf.write(song, demo_song.render(4.0), 44100)
    job = await client.submit(song, stems=2, quality="fast")
    await client.follow(job["id"], timeout_s=180)
    done = await client.job(job["id"])
    assert done["status"] == "completed"
    return done


async def test_another_owner_gets_404_on_every_route(system: Any, mongo_db: Any, finished_job: dict[str, Any]) -> None:
    intruder = await ApiKeys(mongo_db).create("intruder")
    job_id = finished_job["id"]
    stem = finished_job["result"]["stems"][0]["name"]
    routes = [
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/analysis"),
        ("GET", f"/v1/jobs/{job_id}/stems/{stem}"),
        ("GET", f"/v1/jobs/{job_id}/stems.zip"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("DELETE", f"/v1/jobs/{job_id}"),
    ]
    async with httpx.AsyncClient(base_url=system.gateway_url, headers={"Authorization": f"Bearer {intruder}"}) as http:
        for method, path in routes:
            response = await http.request(method, path)
            assert response.status_code == 404, f"{method} {path}: {response.status_code}"
            assert response.json()["code"] == "job_not_found"
        listed = await http.get("/v1/jobs")
        assert job_id not in [item["id"] for item in listed.json()["items"]]


async def test_the_owner_keeps_everything_after_an_intruders_delete(
    system: Any, mongo_db: Any, finished_job: dict[str, Any], client: StemflowClient
) -> None:
    intruder = await ApiKeys(mongo_db).create("intruder-delete")
    async with httpx.AsyncClient(base_url=system.gateway_url, headers={"Authorization": f"Bearer {intruder}"}) as http:
        assert (await http.delete(f"/v1/jobs/{finished_job['id']}")).status_code == 404
    job = await client.job(finished_job["id"])
    assert job["status"] == "completed"
    stems = await client.download_stems(job, Path(system.env["BLOB_DIR"]).parent / f"check-{job['id']}")
    assert len(stems) == 2 and all(p.stat().st_size > 0 for p in stems)


async def test_another_owner_cannot_subscribe_or_resume(
    system: Any, mongo_db: Any, finished_job: dict[str, Any], client: StemflowClient
) -> None:
    intruder = await ApiKeys(mongo_db).create("intruder-ws")
    headers = {"Authorization": f"Bearer {intruder}"}
    async with websockets.connect(system.events_url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "subscribe", "job_id": finished_job["id"], "last_event_id": "x"}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["type"] == "error" and reply["code"] == "job_not_found"
        # Subscribed to all of *its* jobs, with a resume point: it must get none of the owner's events.
        await ws.send(json.dumps({"type": "subscribe", "last_event_id": "none"}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["type"] == "subscribed"
        await ws.send(json.dumps({"type": "ping"}))
        while (frame := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != "pong":
            assert all(e["subject"] != finished_job["id"] for e in frame.get("events", []))
    # The owner's job is intact after the intruder's attempts.
    assert (await client.job(finished_job["id"]))["status"] == "completed"


async def test_the_websocket_refuses_a_missing_or_wrong_key(system: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer sfk_wrong"}):
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with websockets.connect(system.events_url, additional_headers=headers) as ws:
                await ws.recv()
