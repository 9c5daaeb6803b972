"""Remembering which units of work are done, so a redelivered message is not worked twice (cancellation: cancellation.py)."""

from __future__ import annotations

from typing import Any


class DoneMarks:
    """Redis marks `<prefix>done:<scope>:<key>` set after a unit's effects are durable."""

    def __init__(self, redis: Any, prefix: str, ttl_s: int = 7 * 24 * 3600) -> None:
        self._redis = redis
        self._prefix = f"{prefix}done:"
        self._ttl = ttl_s

    def _key(self, scope: str, key: str) -> str:
        return f"{self._prefix}{scope}:{key}"

    async def is_done(self, scope: str, key: str) -> bool:
        return bool(await self._redis.exists(self._key(scope, key)))

    async def mark_done(self, scope: str, key: str) -> None:
        await self._redis.set(self._key(scope, key), b"1", ex=self._ttl)
