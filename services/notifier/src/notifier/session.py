"""One WebSocket connection: its messages in, its batches out, its subscriptions (protocol in websocket.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from typing import Any

from fastapi import WebSocket
from redis.exceptions import RedisError
from starlette.websockets import WebSocketDisconnect

from stemflow_shared import metrics

from .gateway_client import GatewayUnavailable
from .hub import Client
from .mailbox import Item, Mailbox
from .resume import Replay

log = logging.getLogger(__name__)

CLOSE_IDLE = 4000
CLOSE_TOO_SLOW = 4008
CLOSE_REVOKED = 4401
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EVENTS_SENT: dict[str, Any] = {}


class Session:
    """The life of one connection, from accept to close."""

    __slots__ = ("_client", "_closed", "_last_activity", "_loop", "_sending", "_state", "_token", "_ws")

    def __init__(self, websocket: WebSocket, token: str, owner: str) -> None:
        self._ws = websocket
        self._state = websocket.app.state
        self._token = token
        settings = self._state.settings
        mailbox = Mailbox(settings.batch_window_ms / 1000.0, settings.batch_max_events, settings.client_queue_max)
        self._client = Client(owner, mailbox)
        self._loop = asyncio.get_running_loop()
        self._last_activity = self._loop.time()
        self._closed = False
        # Held while a replay is sent, so that batches of live events do not interleave with it.
        self._sending = asyncio.Lock()

    async def run(self) -> None:
        hub = self._state.hub
        hub.add(self._client)
        sender = asyncio.create_task(self._send_batches())
        try:
            params = self._ws.query_params
            if params.get("job_id"):
                await self._subscribe({"job_id": params["job_id"], "last_event_id": params.get("last_event_id")})
            elif params.get("batch_id"):
                await self._subscribe({"batch_id": params["batch_id"]})
            await self._receive()
        except WebSocketDisconnect:
            pass
        finally:
            hub.remove(self._client)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    async def _receive(self) -> None:
        idle_timeout = self._state.settings.idle_timeout_s
        while not self._closed:
            remaining = self._last_activity + idle_timeout - self._loop.time()
            if remaining <= 0:
                await self._close(CLOSE_IDLE, "idle", "idle")
                return
            try:
                async with asyncio.timeout(remaining):
                    message = await self._ws.receive()
            except TimeoutError:
                continue
            if message["type"] == "websocket.disconnect":
                return
            self._last_activity = self._loop.time()
            await self._handle(message.get("text") or message.get("bytes") or "")

    async def _handle(self, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
            kind = message.get("type")
        except (ValueError, AttributeError):
            await self._error("malformed_message", "send JSON objects")
            return
        if kind == "subscribe":
            await self._subscribe(message)
        elif kind == "unsubscribe":
            await self._unsubscribe(message)
        elif kind == "ping":
            await self._send_json({"type": "pong"})
        else:
            await self._error("unknown_message", f"unknown type {str(kind)[:40]!r}")

    async def _subscribe(self, message: dict[str, Any]) -> None:
        try:
            if message.get("batch_id") is not None:
                await self._subscribe_batch(message["batch_id"])
            else:
                await self._subscribe_jobs(message)
        except GatewayUnavailable as exc:
            log.warning("subscription not answered: %s", exc)
            await self._error("unavailable", "the job state cannot be read now; try again")

    async def _subscribe_jobs(self, message: dict[str, Any]) -> None:
        """One job, or with no job_id all of the owner's; with last_event_id, what was missed first."""
        job_id, last_event_id = message.get("job_id"), message.get("last_event_id")
        if job_id is not None and not (isinstance(job_id, str) and JOB_ID.match(job_id)):
            await self._error("invalid_job_id", "job_id must be a job id")
            return
        if last_event_id is not None and not (isinstance(last_event_id, str) and 0 < len(last_event_id) <= 128):
            await self._error("invalid_last_event_id", "last_event_id must be an event id")
            return
        client, settings = self._client, self._state.settings
        if job_id is not None and job_id not in client.jobs and len(client.jobs) >= settings.max_subscriptions:
            await self._error("too_many_subscriptions", f"at most {settings.max_subscriptions} jobs per connection")
            return
        if not await self._still_authorized():
            return
        replay: Replay | None = None
        client.hold()
        added = False
        try:
            added = self._state.hub.subscribe(client, job_id)
            reply: dict[str, Any] = {"type": "subscribed", "job_id": job_id}
            if job_id is not None:
                record = await self._state.gateway.job(client.owner, job_id)
                if record is None:
                    if added:
                        self._state.hub.unsubscribe(client, job_id)
                    await self._error("job_not_found", "no such job", job_id=job_id)
                    return
                reply["state"] = record.job.model_dump(mode="json")
            else:
                unfinished = await self._unfinished_jobs()
                if unfinished:
                    reply["jobs"] = unfinished
            if last_event_id:
                replay = await self._replay(last_event_id, job_id)
                reply["resumed"] = replay.resumed
            async with self._sending:
                await self._send_json(reply)
                if replay is not None:
                    await self._send_replay(replay.items)
        except GatewayUnavailable:
            if added:
                self._state.hub.unsubscribe(client, job_id)
            raise
        finally:
            if replay is None:
                client.release()
            else:
                client.release({item.id for item in replay.items}, job_id, replay.upto)

    async def _subscribe_batch(self, batch_id: Any) -> None:
        """Every job of one of the owner's batches (POST /v1/batches): their states first, then their events."""
        if not (isinstance(batch_id, str) and JOB_ID.match(batch_id)):
            await self._error("invalid_batch_id", "batch_id must be a batch id")
            return
        client, settings = self._client, self._state.settings
        if not await self._still_authorized():
            return
        jobs = await self._state.gateway.batch_jobs(client.owner, batch_id)
        if jobs is None:
            await self._error("batch_not_found", "no such batch", batch_id=batch_id)
            return
        job_ids = [job["id"] for job in jobs]
        if len(set(client.jobs) | set(job_ids)) > settings.max_subscriptions:
            await self._error("too_many_subscriptions", f"at most {settings.max_subscriptions} jobs per connection")
            return
        client.hold()
        added: list[str] = []
        try:
            added = [job_id for job_id in job_ids if self._state.hub.subscribe(client, job_id)]
            # Read again once subscribed: an event that came between the two reads is held, not lost.
            jobs = await self._state.gateway.batch_jobs(client.owner, batch_id) or []
            async with self._sending:
                await self._send_json({"type": "subscribed", "batch_id": batch_id, "jobs": jobs})
        except GatewayUnavailable:
            for job_id in added:
                self._state.hub.unsubscribe(client, job_id)
            raise
        finally:
            client.release()

    async def _unfinished_jobs(self) -> list[dict[str, Any]]:
        """The current state of the owner's unfinished jobs, newest first, for a subscription to all of them."""
        limit = self._state.settings.snapshot_max_jobs
        if limit == 0:
            return []
        return await self._state.gateway.unfinished_jobs(self._client.owner, limit)

    async def _send_replay(self, items: list[Item]) -> None:
        """The missed events in order, a batch at a time, each write waiting for the client to take the last."""
        size = self._state.settings.batch_max_events
        for start in range(0, len(items), size):
            await self._send_batch(items[start : start + size])

    async def _replay(self, last_event_id: str, job_id: str | None) -> Replay:
        try:
            replay = await self._state.event_log.since(self._client.owner, last_event_id, job_id)
        except RedisError as exc:
            log.warning("resume unavailable: %s", exc)
            replay = Replay([], False, None)
        metrics.WS_RESUME_REQUESTS.labels("resumed" if replay.resumed else "gap").inc()
        return replay

    async def _unsubscribe(self, message: dict[str, Any]) -> None:
        job_id = message.get("job_id")
        if job_id is not None and not isinstance(job_id, str):
            await self._error("invalid_job_id", "job_id must be a job id")
            return
        client = self._client
        self._state.hub.unsubscribe(client, job_id)
        client.mailbox.discard(lambda job: client.all_jobs or job in client.jobs)
        await self._send_json({"type": "unsubscribed", "job_id": job_id})

    async def _still_authorized(self) -> bool:
        """Whether the key is still valid (GatewayUnavailable when that cannot be known now)."""
        principal = await self._state.gateway.principal(self._token)
        if principal is not None and principal.owner == self._client.owner:
            return True
        await self._close(CLOSE_REVOKED, "API key revoked", "revoked")
        return False

    async def _send_batches(self) -> None:
        mailbox = self._client.mailbox
        while True:
            batch = await mailbox.next_batch()
            if mailbox.overflowed:
                await self._close(CLOSE_TOO_SLOW, "too slow: reconnect with last_event_id", "too_slow")
                return
            if batch:
                async with self._sending:
                    await self._send_batch(batch)

    async def _send_batch(self, batch: list[Item]) -> None:
        await self._send_text(batch_frame(batch))
        for item in batch:
            _events_sent(item.type).inc()

    async def _error(self, code: str, message: str, **extra: Any) -> None:
        await self._send_json({"type": "error", "code": code, "message": message, **extra})

    async def _send_json(self, payload: dict[str, Any]) -> None:
        await self._send_text(json.dumps(payload, separators=(",", ":")))

    async def _send_text(self, text: str) -> None:
        if self._closed:
            return
        await self._ws.send_text(text)
        self._last_activity = self._loop.time()
        metrics.WS_FRAMES_SENT.inc()

    async def _close(self, code: int, reason: str, label: str) -> None:
        if self._closed:
            return
        self._closed = True
        metrics.WS_CLOSED.labels(label).inc()
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await self._ws.close(code, reason)


def batch_frame(batch: list[Item]) -> str:
    """A `batch` frame, made of the events' JSON as it was serialized once for all clients."""
    return '{"type":"batch","events":[' + ",".join(item.json for item in batch) + "]}"


def _events_sent(event_type: str) -> Any:
    counter = _EVENTS_SENT.get(event_type)
    if counter is None:
        counter = _EVENTS_SENT[event_type] = metrics.WS_EVENTS_SENT.labels(event_type)
    return counter
