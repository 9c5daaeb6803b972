"""A practice mix through the running system: requested over HTTP, rendered by the analyzer, followed over
the WebSocket to its end, downloaded, asked again (the same mix, not rendered twice), deleted with the job."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf
import websockets

from stemflow_dev import demo_song
from stemflow_dev.client import StemflowClient

pytestmark = pytest.mark.integration
SECONDS = 8.0
MIX_TYPES = {f"stemflow.job.mix.{kind}.v1" for kind in ("progress", "completed", "failed")}


@pytest.fixture(scope="module")
def song(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mix-song") / "song.wav"
    sf.write(path, demo_song.render(SECONDS, bpm=120.0), 44100, subtype="PCM_16")
    return path


async def mix_events(client: StemflowClient, job_id: str, mix_id_of: Any, timeout_s: float) -> list[dict[str, Any]]:
    """Subscribe to the job, then ask for the mix (`mix_id_of()` posts it and says its id); its events to the end."""
    events: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {client.api_key}"}
    async with websockets.connect(client.events_url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "subscribe", "job_id": job_id}))
        assert json.loads(await ws.recv())["type"] == "subscribed"
        mix_id = await mix_id_of()

        async def receive() -> None:
            while True:
                frame = json.loads(await ws.recv())
                for event in frame.get("events", []):
                    if event["type"] in MIX_TYPES and event["data"]["mix"]["id"] == mix_id:
                        events.append(event)
                        if event["data"]["mix"]["status"] in ("completed", "failed"):
                            return

        await asyncio.wait_for(receive(), timeout_s)
    return events


async def test_a_practice_mix_is_rendered_and_followed_over_the_websocket(
    client: StemflowClient, song: Path, tmp_path: Path
) -> None:
    job = await client.submit(song, stems=4, quality="fast", residual=True)
    await client.follow(job["id"], timeout_s=300)
    done = await client.job(job["id"])
    assert done["status"] == "completed"
    asked: dict[str, Any] = {}
    options = {"preset": "instrumental", "tempo": 0.75, "semitones": -2, "click": True, "format": "flac"}

    async def request() -> str:
        answer = await client.http.post(f"/v1/jobs/{job['id']}/mixes", json=options)
        assert answer.status_code == 202, answer.text
        asked.update(answer.json())
        return asked["id"]

    events = await mix_events(client, job["id"], request, timeout_s=180)
    states = [e["data"]["mix"] for e in events]
    assert states[-1]["status"] == "completed", states[-1]
    assert states[0]["status"] in ("queued", "running")
    percents = [s["percent"] for s in states]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert all("owner" not in e["data"] and e["subject"] == job["id"] for e in events)

    mix = (await client.http.get(f"/v1/jobs/{job['id']}/mixes/{asked['id']}")).json()
    assert mix["status"] == "completed" and mix["gains"]["vocals"] == 0.0
    assert mix["file"]["duration_s"] == pytest.approx(SECONDS / 0.75, abs=0.01)
    assert states[-1]["path"] == f"/v1/jobs/{job['id']}/mixes/{asked['id']}/file"
    download = await client.http.get(states[-1]["path"])
    assert download.status_code == 200 and download.headers["content-type"] == "audio/flac"
    path = tmp_path / "mix.flac"
    path.write_bytes(download.content)
    info = sf.info(path)
    assert info.channels == 2 and info.samplerate == 44100 and info.subtype == "PCM_24"
    assert info.frames == round(SECONDS * 44100 / 0.75)

    # The same parameters: the same mix, at once, not rendered again.
    again = await client.http.post(f"/v1/jobs/{job['id']}/mixes", json=options)
    assert again.status_code == 200 and again.json()["id"] == asked["id"]
    assert again.json()["file"]["render_s"] == mix["file"]["render_s"]

    # Stems at unity gain mix back to the original (the job has its residual stem): no gain to match.
    async def unity() -> str:
        answer = await client.http.post(f"/v1/jobs/{job['id']}/mixes", json={"bit_depth": 32})
        assert answer.status_code == 202, answer.text
        asked["unity"] = answer.json()["id"]
        return asked["unity"]

    ended = await mix_events(client, job["id"], unity, timeout_s=120)
    assert ended[-1]["data"]["mix"]["status"] == "completed"
    state = (await client.http.get(f"/v1/jobs/{job['id']}/mixes/{asked['unity']}")).json()
    assert abs(state["file"]["gain_db"]) < 0.01

    assert (await client.http.delete(f"/v1/jobs/{job['id']}")).status_code == 204
    assert (await client.http.get(f"/v1/jobs/{job['id']}/mixes/{asked['id']}")).status_code == 404


async def test_the_cli_renders_and_downloads_a_practice_mix(
    client: StemflowClient, system: Any, song: Path, tmp_path: Path
) -> None:
    job = await client.submit(song, stems=2, quality="fast")
    await client.follow(job["id"], timeout_s=300)
    script = Path(sys.executable).with_name("stemflow")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "stemflow_cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMFLOW_")}
    env.update(
        STEMFLOW_URL=system.gateway_url, STEMFLOW_API_KEY=client.api_key, STEMFLOW_CONFIG=str(tmp_path / "c.toml")
    )
    argv = ["practice", job["id"], "--preset", "karaoke", "--tempo", "1.25", "--section", "2:6", "--loops", "2"]
    ran = await asyncio.create_subprocess_exec(
        *command, *argv, "--format", "mp3", "--out", str(tmp_path / "mixes") + "/", "--json", "--timeout", "180",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(ran.communicate(), 240)
    assert ran.returncode == 0, err.decode()
    mix = json.loads(out.decode().strip().splitlines()[-1])
    assert mix["status"] == "completed" and mix["gains"] == {"vocals": 0.15, "accompaniment": 1.0}
    info = sf.info(mix["path"])
    assert Path(mix["path"]).parent == tmp_path / "mixes"
    assert info.duration == pytest.approx(2 * 4.0 / 1.25, abs=0.1)
    # Asked again: the same mix, at once.
    again = await asyncio.create_subprocess_exec(
        *command, *argv, "--format", "mp3", "--no-wait", "--json", stdout=asyncio.subprocess.PIPE, env=env
    )
    out, _ = await asyncio.wait_for(again.communicate(), 60)
    assert again.returncode == 0 and json.loads(out.decode().splitlines()[-1])["id"] == mix["id"]
