"""A small client of the public API: submit a song, follow it over the WebSocket, fetch results."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import websockets

TERMINAL = {"stemflow.job.completed.v1", "stemflow.job.failed.v1", "stemflow.job.cancelled.v1"}


class StemflowClient:
    def __init__(self, base_url: str, events_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.events_url = events_url
        self.api_key = api_key
        self.http = httpx.AsyncClient(
            base_url=self.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def submit(self, path: Path, **options: Any) -> dict[str, Any]:
        with open(path, "rb") as fh:
            files = {"file": (path.name, fh, "audio/wav")}
            data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}
            response = await self.http.post("/v1/jobs", files=files, data=data)
        response.raise_for_status()
        return response.json()

    async def follow(
        self, job_id: str, on_event: Callable[[dict[str, Any]], None] | None = None, timeout_s: float = 600
    ) -> list[dict[str, Any]]:
        """Every frame received until the job's terminal event (the first frame is its current state)."""
        import asyncio

        frames: list[dict[str, Any]] = []
        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with websockets.connect(self.events_url, additional_headers=headers) as ws:
            await ws.send(json.dumps({"type": "subscribe", "job_id": job_id}))

            async def receive() -> None:
                while True:
                    frame = json.loads(await ws.recv())
                    frames.append(frame)
                    if frame.get("type") == "subscribed" and (frame.get("state") or {}).get("status") in (
                        "completed",
                        "failed",
                        "cancelled",
                    ):
                        return
                    for event in frame.get("events", []):
                        if on_event is not None:
                            on_event(event)
                        if event["type"] in TERMINAL:
                            return

            await asyncio.wait_for(receive(), timeout_s)
        return frames

    async def job(self, job_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/v1/jobs/{job_id}")
        response.raise_for_status()
        return response.json()

    async def download_stems(self, job: dict[str, Any], out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for stem in job["result"]["stems"]:
            path = out_dir / f"{stem['name']}.{stem['format']}"
            async with self.http.stream("GET", stem["url"]) as response:
                response.raise_for_status()
                with open(path, "wb") as fh:
                    async for chunk in response.aiter_bytes():
                        fh.write(chunk)
            paths.append(path)
        return paths

    async def analysis(self, job_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/v1/jobs/{job_id}/analysis")
        response.raise_for_status()
        return response.json()


class EventWatch:
    """A WebSocket subscribed to all of a key's jobs, keeping every event it is pushed (tests count them)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.subscribed = asyncio.Event()
        self._changed = asyncio.Condition()

    async def run(self, url: str, key: str) -> None:
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            await ws.send(json.dumps({"type": "subscribe"}))
            async for raw in ws:
                frame = json.loads(raw)
                if frame.get("type") == "subscribed":
                    self.subscribed.set()
                async with self._changed:
                    self.events.extend(frame.get("events", []))
                    self._changed.notify_all()

    def count(self, job_id: str, kind: str) -> int:
        """How many `stemflow.job.<kind>.v1` events job `job_id` was pushed."""
        return Counter((e["subject"], e["type"]) for e in self.events)[(job_id, f"stemflow.job.{kind}.v1")]

    def terminal(self, job_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["subject"] == job_id and e["type"] in TERMINAL]

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        await asyncio.wait_for(wait(), timeout_s)
