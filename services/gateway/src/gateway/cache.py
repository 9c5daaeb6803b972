"""A Redis read cache of rendered jobs that can never go stale after a transition.

Writers store the new version after every change; a reader that fetched an
older version from MongoDB cannot overwrite a newer one (a version compare in
one Lua script), so a cached job is always the latest or absent. An entry holds
the JSON body and, when it is over the GZip threshold, its gzip form too, so a
hit is served without rendering or compressing anything.

List pages are built from the same entries (`bodies`: only those of the version
MongoDB has now), and an owner's pages (first and cursor pages alike) are cached
whole: every write of one of the owner's jobs bumps the owner's list generation in
the same script, and a page is kept only if the generation it was read under is
still current, so a page never outlives a change of any job it may show.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from stemflow_shared import metrics, telemetry

log = logging.getLogger(__name__)

GZIP_MIN_BYTES = 1024
# Newer than any real version: what `bury` leaves in place of a deleted job (an empty body reads as a miss).
TOMBSTONE_VERSION = 2**53 - 1

# KEYS: the job, its owner's list generation, its owner's pages ('' when not writing: a read-through fill).
# ARGV: version, owner, body, gzip body ('' for none), TTL.
_SET_IF_NEWER = """
if KEYS[2] ~= '' then
  redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  redis.call('DEL', KEYS[3])
end
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


# KEYS: jobs. ARGV: their versions. Returns the cached body of each job whose cached version is the one given
# ('' where not).
_BODIES = """
local found = {}
for i = 1, #KEYS do
  local cached = redis.call('HMGET', KEYS[i], 'v', 'b')
  if cached[1] == ARGV[i] and cached[2] then found[i] = cached[2] else found[i] = '' end
end
return found
"""

# KEYS: the owner's list generation, the owner's pages, the caller's rate-limit counter (optional).
# ARGV: the counter's TTL, the page's field, the field wanted (its gzip form's when accepted).
# Returns {count, generation, body or false, gzipped}.
_PAGE = """
local count = 0
if KEYS[3] then
  count = redis.call('INCR', KEYS[3])
  if count == 1 then redis.call('EXPIRE', KEYS[3], ARGV[1]) end
end
local generation = redis.call('GET', KEYS[1]) or '0'
local cached = redis.call('HMGET', KEYS[2], 'g', ARGV[3], ARGV[2])
if cached[1] ~= generation then return {count, generation, false, 0} end
if cached[2] and ARGV[3] ~= ARGV[2] then return {count, generation, cached[2], 1} end
return {count, generation, cached[3], 0}
"""

# KEYS: the owner's list generation, the owner's pages. ARGV: the generation the page was read under,
# the page's field, its body, its gzip field, the gzip body ('' for none), TTL, the most fields the pages may
# hold (a page that would go past it, and is not there already, is not kept).
_KEEP_PAGE = """
local generation = redis.call('GET', KEYS[1]) or '0'
if generation ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], 'g') ~= generation then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'g', generation)
elseif redis.call('HLEN', KEYS[2]) + 2 > tonumber(ARGV[7]) and redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], ARGV[4], ARGV[5]) end
redis.call('EXPIRE', KEYS[2], ARGV[6])
if generation ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
return 1
"""


@dataclass(frozen=True)
class CachedJob:
    owner: str
    version: int
    body: bytes
    gzipped: bool


@dataclass(frozen=True)
class CachedPage:
    """An owner's cached list page (`body` None on a miss) and the list generation it was looked up under."""

    generation: bytes
    body: bytes | None
    gzipped: bool


class JobCache:
    def __init__(self, redis: Any, prefix: str, ttl_s: int, gzip_level: int = 1, pages_per_owner: int = 64) -> None:
        self._redis = redis
        # The reads of polls and list pages, when their request is not traced, skip the Redis instrumentation's
        # wrapper (telemetry.without_redis_spans); a traced request's reads go through it and keep their spans.
        self._untraced_redis = telemetry.without_redis_spans(redis)
        self._prefix = f"{prefix}job:"
        self._lists = f"{prefix}jobs:"
        self._ttl = ttl_s
        self._gzip_level = gzip_level
        self._page_fields = 1 + 2 * pages_per_owner  # the generation, and each page's body and gzip body
        self._script = redis.register_script(_SET_IF_NEWER)
        self._get_counting = redis.register_script(_GET_COUNTING)
        self._bodies = redis.register_script(_BODIES)
        self._page = redis.register_script(_PAGE)
        self._keep_page = redis.register_script(_KEEP_PAGE)
        self._hits = metrics.CACHE_REQUESTS.labels("job", "hit")
        self._misses = metrics.CACHE_REQUESTS.labels("job", "miss")

    def _reader(self) -> Any:
        """The client of a read: the instrumented one under a recording span, else the one without spans."""
        return self._redis if telemetry.recording() else self._untraced_redis

    def _key(self, job_id: str) -> str:
        return self._prefix + job_id

    def _list_keys(self, owner: str) -> list[str]:
        """The owner's list generation and cached pages."""
        return [f"{self._lists}{owner}:generation", f"{self._lists}{owner}:pages"]

    async def get(
        self, job_id: str, *, gzip_ok: bool = False, counter_key: str | None = None, counter_ttl_s: int = 120
    ) -> tuple[CachedJob | None, int]:
        """The cached job or None, and the incremented `counter_key` (0 without one).

        A Redis outage is a miss and a count of 0, never an error.
        """
        keys = [self._key(job_id)] if counter_key is None else [self._key(job_id), counter_key]
        try:
            count, owner, version, body, gzipped = await self._get_counting(
                keys=keys, args=[counter_ttl_s, "z" if gzip_ok else "b"], client=self._reader()
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

    async def put(self, job_id: str, owner: str, version: int, body: bytes, *, changed: bool = True) -> bytes:
        """Cache a rendered job with its gzip form, which it returns (empty under the GZip threshold).

        `changed`: the job was just written (or may have been), so its owner's cached pages go too;
        a list's read-through fill of what MongoDB has (`changed=False`) leaves them.
        """
        compressed = self.compress(body)
        lists = self._list_keys(owner) if changed else ["", ""]
        await self._store(job_id, lists, [version, owner, body, compressed, self._ttl])
        return compressed

    async def bury(self, job_id: str, owner: str) -> None:
        """Mark a deleted job so that a reader still holding an older copy cannot cache it again."""
        await self._store(job_id, self._list_keys(owner), [TOMBSTONE_VERSION, "", b"", b"", self._ttl])

    async def _store(self, job_id: str, lists: list[str], args: list[Any]) -> None:
        try:
            await self._script(keys=[self._key(job_id), *lists], args=args)
        except RedisError as exc:
            log.warning("job cache write failed, dropping the entry: %s", exc)
            await self.drop(job_id, lists)

    async def drop(self, job_id: str, lists: list[str] | None = None) -> None:
        """Forget a job (and the pages of `lists`, when given); what is gone is read from MongoDB again."""
        try:
            await self._redis.delete(self._key(job_id), *(key for key in lists or [] if key))
        except RedisError as exc:
            log.warning("job cache delete failed: %s", exc)

    async def fill(self, rendered: list[tuple[dict[str, Any], bytes]]) -> None:
        """Cache jobs a list read from MongoDB (documents and their bodies), in one round trip; no list changes."""
        if not rendered:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for doc, body in rendered:
                    args = [doc["version"], doc["owner"], body, self.compress(body), self._ttl]
                    await self._script(keys=[self._key(doc["_id"]), "", ""], args=args, client=pipe)
                await pipe.execute()
        except RedisError as exc:
            log.warning("job cache fill failed: %s", exc)

    async def bodies(self, versions: list[tuple[str, int]]) -> list[bytes | None]:
        """The cached JSON bodies of (job id, version) pairs, None where the cache lacks that version, in one
        call; a Redis outage is all misses."""
        if not versions:
            return []
        keys = [self._key(job_id) for job_id, _ in versions]
        try:
            found = await self._bodies(keys=keys, args=[version for _, version in versions], client=self._reader())
        except RedisError as exc:
            log.warning("job cache read failed: %s", exc)
            return [None] * len(versions)
        return [body or None for body in found]

    async def page(
        self, owner: str, variant: str, *, gzip_ok: bool, counter_key: str | None, counter_ttl_s: int
    ) -> tuple[CachedPage, int]:
        """The owner's cached page `variant` (its gzip form when accepted), and the counted requests.

        A Redis outage is a miss under a generation no page can be kept for, and a count of 0.
        """
        keys = self._list_keys(owner) + ([counter_key] if counter_key else [])
        wanted = f"{variant}:z" if gzip_ok else variant
        try:
            count, generation, body, gzipped = await self._page(
                keys=keys, args=[counter_ttl_s, variant, wanted], client=self._reader()
            )
        except RedisError as exc:
            log.warning("list cache read failed: %s", exc)
            return CachedPage(b"", None, False), 0
        return CachedPage(generation, body or None, bool(gzipped)), int(count)

    async def keep_page(self, owner: str, variant: str, generation: bytes, body: bytes) -> bytes:
        """Cache a page read under `generation` unless a job of the owner changed since (or the owner's pages
        are full); its gzip form."""
        compressed = self.compress(body)
        if generation:
            args = [generation, variant, body, f"{variant}:z", compressed, self._ttl, self._page_fields]
            try:
                await self._keep_page(keys=self._list_keys(owner), args=args)
            except RedisError as exc:
                log.warning("list cache write failed: %s", exc)
        return compressed
