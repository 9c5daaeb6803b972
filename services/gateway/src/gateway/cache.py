"""A Redis read cache of rendered jobs that can never go stale after a transition.

Writers store the new version after every change; a reader that fetched an
older version from MongoDB cannot overwrite a newer one (a version compare in
one Lua script), so a cached job is always the latest or absent. An entry holds
the JSON body and, when it is over the GZip threshold, its gzip form too, so a
hit is served without rendering or compressing anything.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from stemflow_shared import metrics

log = logging.getLogger(__name__)

GZIP_MIN_BYTES = 1024
# Newer than any real version: what `bury` leaves in place of a deleted job (an empty body reads as a miss).
TOMBSTONE_VERSION = 2**53 - 1

# ARGV: version, owner, body, gzip body ('' for none), TTL.
_SET_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], 'v')
if (not current) or tonumber(current) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'o', ARGV[2], 'b', ARGV[3])
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'z', ARGV[4]) else redis.call('HDEL', KEYS[1], 'z') end
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return 1
end
return 0
"""

# The cached job (its gzip form when ARGV[2] is 'z' and there is one) and, when KEYS[2] is given,
# the caller's rate-limit counter, counted in the same call.
_GET_COUNTING = """
local count = 0
if KEYS[2] then
  count = redis.call('INCR', KEYS[2])
  if count == 1 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
end
local cached = redis.call('HMGET', KEYS[1], 'o', 'v', ARGV[2], 'b')
local body, gzipped = cached[3], 1
if (not body) or ARGV[2] == 'b' then body, gzipped = cached[4], 0 end
return {count, cached[1], cached[2], body, gzipped}
"""


@dataclass(frozen=True)
class CachedJob:
    owner: str
    version: int
    body: bytes
    gzipped: bool


class JobCache:
    def __init__(self, redis: Any, prefix: str, ttl_s: int, gzip_level: int = 1) -> None:
        self._redis = redis
        self._prefix = f"{prefix}job:"
        self._ttl = ttl_s
        self._gzip_level = gzip_level
        self._script = redis.register_script(_SET_IF_NEWER)
        self._get_counting = redis.register_script(_GET_COUNTING)
        self._hits = metrics.CACHE_REQUESTS.labels("job", "hit")
        self._misses = metrics.CACHE_REQUESTS.labels("job", "miss")

    def _key(self, job_id: str) -> str:
        return self._prefix + job_id

    async def get(
        self, job_id: str, *, gzip_ok: bool = False, counter_key: str | None = None, counter_ttl_s: int = 120
    ) -> tuple[CachedJob | None, int]:
        """The cached job or None, and the incremented `counter_key` (0 without one).

        A Redis outage is a miss and a count of 0, never an error.
        """
        keys = [self._key(job_id)] if counter_key is None else [self._key(job_id), counter_key]
        try:
            count, owner, version, body, gzipped = await self._get_counting(
                keys=keys, args=[counter_ttl_s, "z" if gzip_ok else "b"]
            )
        except RedisError as exc:
            log.warning("job cache read failed: %s", exc)
            return None, 0
        if not body or owner is None or version is None:
            self._misses.inc()
            return None, int(count)
        self._hits.inc()
        return CachedJob(owner.decode(), int(version), body, bool(gzipped)), int(count)

    def compress(self, body: bytes) -> bytes:
        """The gzip form of a body over the GZip threshold, else empty."""
        return gzip.compress(body, self._gzip_level, mtime=0) if len(body) >= GZIP_MIN_BYTES else b""

    async def put(self, job_id: str, owner: str, version: int, body: bytes) -> bytes:
        """Cache a rendered job with its gzip form, which it returns (empty under the GZip threshold)."""
        compressed = self.compress(body)
        await self._store(job_id, [version, owner, body, compressed, self._ttl])
        return compressed

    async def bury(self, job_id: str) -> None:
        """Mark a deleted job so that a reader still holding an older copy cannot cache it again."""
        await self._store(job_id, [TOMBSTONE_VERSION, "", b"", b"", self._ttl])

    async def _store(self, job_id: str, args: list[Any]) -> None:
        try:
            await self._script(keys=[self._key(job_id)], args=args)
        except RedisError as exc:
            log.warning("job cache write failed, dropping the entry: %s", exc)
            await self.drop(job_id)

    async def drop(self, job_id: str) -> None:
        try:
            await self._redis.delete(self._key(job_id))
        except RedisError as exc:
            log.warning("job cache delete failed: %s", exc)
