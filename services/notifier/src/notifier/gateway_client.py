"""What the notifier asks the gateway, which owns job state: whose an API key is, a job's state and callback
URL, an owner's unfinished jobs, a batch's jobs (the internal API, contract in stemflow_shared.internal).

One pooled HTTP client with timeouts. API-key lookups are cached for PRINCIPAL_CACHE_TTL_S, so that a
WebSocket's connect and its first subscriptions ask once, and concurrent lookups of one key (a reconnect
storm) share one request; unknown keys are cached too, in a smaller bounded map, so that a client retrying a
wrong key does not reach the gateway each time and random keys cannot grow the cache without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

import httpx

from stemflow_shared.auth import KEY_PREFIX, hash_key
from stemflow_shared.internal import (
    JOBS_PATH,
    MAX_API_KEY_CHARS,
    PING_PATH,
    PRINCIPALS_PATH,
    BatchRecord,
    JobList,
    JobRecord,
    Principal,
    batch_path,
    job_path,
)

log = logging.getLogger(__name__)


class GatewayUnavailable(Exception):
    """The gateway gave no answer (unreachable, timed out, failed, or refused the service token)."""


class ExpiringCache:
    """Entries that expire, at most `size` of them (the oldest go first)."""

    def __init__(self, ttl_s: float, size: int) -> None:
        self._ttl_s, self._size = ttl_s, size
        self._entries: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()

    def get(self, digest: str) -> tuple[bool, Principal | None]:
        entry = self._entries.get(digest)
        if entry is None:
            return False, None
        if entry[0] <= time.monotonic():
            del self._entries[digest]
            return False, None
        return True, entry[1]

    def put(self, digest: str, principal: Principal | None) -> None:
        if self._ttl_s <= 0 or self._size <= 0:
            return
        self._entries[digest] = (time.monotonic() + self._ttl_s, principal)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def drop(self, digest: str) -> None:
        self._entries.pop(digest, None)

    def __len__(self) -> int:
        return len(self._entries)


class GatewayClient:
    def __init__(self, http: httpx.AsyncClient, *, cache_ttl_s: float, cache_size: int, unknown_size: int) -> None:
        self._http = http
        self._known = ExpiringCache(cache_ttl_s, cache_size)
        self._unknown = ExpiringCache(cache_ttl_s, unknown_size)
        self._lookups: dict[str, asyncio.Future[Principal | None]] = {}

    async def principal(self, api_key: str | None) -> Principal | None:
        """Whose the key is; None for a key that is malformed, unknown or revoked."""
        if not api_key or not api_key.startswith(KEY_PREFIX) or len(api_key) > MAX_API_KEY_CHARS:
            return None
        digest = hash_key(api_key)
        for cache in (self._known, self._unknown):
            found, principal = cache.get(digest)
            if found:
                return principal
        pending = self._lookups.get(digest)
        if pending is None:
            pending = self._lookups[digest] = asyncio.ensure_future(self._look_up(api_key, digest))
            pending.add_done_callback(lambda _: self._lookups.pop(digest, None))
        return await asyncio.shield(pending)

    async def _look_up(self, api_key: str, digest: str) -> Principal | None:
        response = await self._request("POST", PRINCIPALS_PATH, json={"api_key": api_key})
        if response is None:
            self._known.drop(digest)
            self._unknown.put(digest, None)
            return None
        principal = Principal.model_validate(response.json())
        self._unknown.drop(digest)
        self._known.put(digest, principal)
        return principal

    async def job(self, owner: str, job_id: str) -> JobRecord | None:
        """One of the owner's jobs (its public document, callback URL), or None."""
        response = await self._request("GET", job_path(job_id), params={"owner": owner})
        return None if response is None else JobRecord.model_validate(response.json())

    async def unfinished_jobs(self, owner: str, limit: int) -> list[dict[str, Any]]:
        """The owner's unfinished jobs, newest first, as public documents."""
        params = {"owner": owner, "unfinished": "true", "limit": str(limit)}
        response = await self._request("GET", JOBS_PATH, params=params)
        return [] if response is None else _documents(JobList.model_validate(response.json()).jobs)

    async def batch_jobs(self, owner: str, batch_id: str) -> list[dict[str, Any]] | None:
        """The jobs of one of the owner's batches in submission order, as public documents; None: no such batch."""
        response = await self._request("GET", batch_path(batch_id), params={"owner": owner})
        return None if response is None else _documents(BatchRecord.model_validate(response.json()).jobs)

    async def ready(self) -> bool:
        """The gateway answers, and takes the service token."""
        try:
            return await self._request("GET", PING_PATH) is not None
        except GatewayUnavailable:
            return False

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        """The gateway's answer; None for a 404; GatewayUnavailable when there is none to use."""
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise GatewayUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}"[:300]) from exc
        let_go_of_stream(response)
        if response.status_code == 404:
            return None
        if response.status_code == 401:
            log.error("the gateway refused the service token: INTERNAL_TOKEN differs from the gateway's")
        if not response.is_success:
            raise GatewayUnavailable(f"{method} {path}: HTTP {response.status_code}")
        return response


_READ = httpx.ByteStream(b"")


def let_go_of_stream(response: httpx.Response) -> None:
    """Drop a read and closed response's stream, which refers back to the response.

    With the request and the pool's entry hanging on them (~40 objects), that cycle would otherwise wait for the
    collector; a request caught in flight by a middle collection is frozen (notifier.heap), and frozen cycles are
    never collected (26-30 requests a 10,000-client run did). Without the stream the response dies by reference
    counting.
    """
    response.stream = _READ


def _documents(jobs: list[Any]) -> list[dict[str, Any]]:
    return [job.model_dump(mode="json") for job in jobs]
