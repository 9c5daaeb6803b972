"""The notifier's WebSocket: subscribe, yield frames, reconnect with `last_event_id` when the line drops."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .errors import CliError, Exit

JOB_PROGRESS = "stemflow.job.progress.v1"
JOB_COMPLETED = "stemflow.job.completed.v1"
JOB_FAILED = "stemflow.job.failed.v1"
JOB_CANCELLED = "stemflow.job.cancelled.v1"
TERMINAL_EVENTS = {JOB_COMPLETED: "completed", JOB_FAILED: "failed", JOB_CANCELLED: "cancelled"}
CLOSE_UNAUTHORIZED = 4401
# The notifier closes connections that send nothing for a while; an application ping keeps a long wait open.
PING_EVERY_S = 60.0


class EventStream:
    """Frames from one WebSocket, subscribed to some jobs (or all of the key's jobs when `job_ids` is None)."""

    def __init__(self, url: str, api_key: str, job_ids: Iterable[str] | None = None, *, reconnects: int = 5) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {api_key}", "User-Agent": "stemflow-cli"}
        self._jobs = list(job_ids) if job_ids is not None else None
        self._reconnects = reconnects
        self._last: dict[str | None, str] = {}

    async def frames(self) -> AsyncIterator[dict[str, Any]]:
        failures = 0
        while True:
            try:
                async with connect(self.url, additional_headers=self._headers, open_timeout=10) as ws:
                    await self._subscribe(ws)
                    pinger = asyncio.create_task(_ping(ws))
                    try:
                        async for raw in ws:
                            failures = 0
                            frame = json.loads(raw)
                            self._remember(frame)
                            yield frame
                    finally:
                        pinger.cancel()
                    cause: object = f"closed with code {ws.close_code}"
            except InvalidStatus as exc:
                if exc.response.status_code in (401, 403):
                    raise self._refused() from exc
                cause = f"HTTP {exc.response.status_code}"
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code == CLOSE_UNAUTHORIZED:
                    raise self._refused() from exc
                cause = exc
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                cause = exc or type(exc).__name__
            failures += 1
            if failures > self._reconnects:
                raise CliError(
                    f"lost the live connection to {self.url}: {cause}",
                    Exit.UNAVAILABLE,
                    hint="is the notifier running? check --events-url / STEMFLOW_EVENTS_URL",
                )
            # Back off before reconnecting, so a notifier restart is not hammered.
            await asyncio.sleep(min(0.25 * 2**failures, 5.0))

    async def _subscribe(self, ws: ClientConnection) -> None:
        targets: list[str | None] = list(self._jobs) if self._jobs is not None else [None]
        for job_id in targets:
            message: dict[str, Any] = {"type": "subscribe"}
            if job_id is not None:
                message["job_id"] = job_id
            if self._last.get(job_id):
                message["last_event_id"] = self._last[job_id]
            await ws.send(json.dumps(message))

    def _remember(self, frame: dict[str, Any]) -> None:
        for event in frame.get("events") or []:
            key = None if self._jobs is None else event.get("subject")
            self._last[key] = event.get("id", "")

    def _refused(self) -> CliError:
        return CliError(
            f"the notifier at {self.url} refused the API key",
            Exit.AUTH,
            hint="set STEMFLOW_API_KEY, pass --api-key, or run `stemflow configure`",
        )


async def _ping(ws: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.sleep(PING_EVERY_S)
            await ws.send(json.dumps({"type": "ping"}))
