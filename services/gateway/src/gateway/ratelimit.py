"""Per-API-key rate limits in Redis: fixed one-minute windows, one round trip per request.

The window counter can also ride along with the job-cache read (see
`JobCache.get`), so a cached `GET /v1/jobs/{id}` costs a single Redis call.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from redis.exceptions import RedisError

from stemflow_shared import telemetry
from stemflow_shared.auth import Principal

from .problems import Problem

log = logging.getLogger(__name__)

WINDOW_S = 60
# Counters outlive their window a little so a late request never restarts one.
COUNTER_TTL_S = 2 * WINDOW_S

COUNT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""


class RateLimiter:
    def __init__(self, redis: Any, prefix: str, per_minute: int) -> None:
        self.per_minute = per_minute
        self._prefix = f"{prefix}rl:"
        self._script = redis.register_script(COUNT)
        # The count is never a span of its own, traced request or not: a poll's and a list page's already ride
        # along with their cache read, and on a traced job creation it was one more Redis span (of eight) that
        # says nothing of the job. A 429 shows in the server span's status.
        self._client = telemetry.without_redis_spans(redis)

    def counter_key(self, who: Principal) -> str | None:
        """The Redis key counting this key's requests in the current window; None when limits are off."""
        if not self.per_minute:
            return None
        return f"{self._prefix}{who.key_id}:{int(time.time() // WINDOW_S)}"

    async def check(self, who: Principal) -> None:
        """Count one request; 429 when the key is over its limit (a Redis outage lets requests through)."""
        key = self.counter_key(who)
        if key is None:
            return
        try:
            count = int(await self._script(keys=[key], args=[COUNTER_TTL_S], client=self._client))
        except RedisError as exc:
            log.warning("rate limit check failed, letting the request through: %s", exc)
            return
        self.enforce(count)

    def enforce(self, count: int) -> None:
        if self.per_minute and count > self.per_minute:
            retry_after = WINDOW_S - int(time.time()) % WINDOW_S
            raise Problem(
                429,
                "rate_limited",
                f"more than {self.per_minute} requests per minute",
                headers={"Retry-After": str(retry_after)},
            )
