"""Cancellation flags: the gateway sets one in Redis when a job is cancelled; workers check it between steps."""

from __future__ import annotations

from typing import Any


def cancel_flag_key(prefix: str, job_id: str) -> str:
    """Redis key the gateway sets when a job is cancelled; workers check it between steps."""
    return f"{prefix}cancel:{job_id}"


async def is_cancelled(redis: Any, prefix: str, job_id: str) -> bool:
    return bool(await redis.exists(cancel_flag_key(prefix, job_id)))
