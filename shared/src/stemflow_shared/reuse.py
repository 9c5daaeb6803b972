"""An index of finished results by audio fingerprint, so identical work is done once.

The gateway records a completed job's results under the fingerprint of its
normalised audio and the options that shape them; ingest looks them up before
publishing work, and on a hit copies the blobs to the new job and publishes the
stage results itself (a cache hit).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ValidationError

from .events import JobCompleted, JobOptions


def result_key(fingerprint: str, options: JobOptions) -> str:
    """The index key: the audio's fingerprint and every option declared as shaping the results."""
    shaping = options.model_dump(mode="json", include=set(JobOptions.shaping_fields()))
    digest = hashlib.sha256(json.dumps([fingerprint, shaping], sort_keys=True).encode()).hexdigest()
    return digest[:40]


class SeparationSummary(BaseModel):
    """How a finished job's stems were made, so a reuse reports the same (untrained models included)."""

    model: str
    device: str
    precision: str
    untrained: bool = False
    reconstruction_error_db: float | None = None


class Reusable(BaseModel):
    """What the index keeps of a finished job."""

    completed: JobCompleted
    separation: SeparationSummary | None = None

    @property
    def job_id(self) -> str:
        return self.completed.job_id


class ResultIndex:
    """Redis `<prefix>result:<key>` → what a finished job produced (its JobCompleted and how it separated)."""

    def __init__(self, redis: Any, prefix: str, ttl_s: int) -> None:
        self._redis = redis
        self._prefix = f"{prefix}result:"
        self._ttl = ttl_s

    async def remember(
        self,
        fingerprint: str,
        options: JobOptions,
        completed: JobCompleted,
        separation: SeparationSummary | None = None,
    ) -> None:
        key = self._prefix + result_key(fingerprint, options)
        entry = Reusable(completed=completed, separation=separation)
        await self._redis.set(key, entry.model_dump_json(), ex=self._ttl)

    async def lookup(self, fingerprint: str, options: JobOptions) -> Reusable | None:
        key = self._prefix + result_key(fingerprint, options)
        raw = await self._redis.get(key)
        if not raw:
            return None
        try:
            return Reusable.model_validate_json(raw)
        except ValidationError:
            # Written by another version, or damaged: a miss, and the entry goes (the next completion rewrites it).
            await self._redis.delete(key)
            return None

    async def forget(self, fingerprint: str, options: JobOptions) -> None:
        await self._redis.delete(self._prefix + result_key(fingerprint, options))
