"""Background loops of the gateway: one failing round is logged, never the end of the loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(interval_s: float, what: str, work: Callable[[], Awaitable[int]]) -> None:
    """Run `work` every `interval_s` seconds until cancelled; it returns how many things it did."""
    while True:
        try:
            done = await work()
            if done:
                log.info("%s: %d", what, done)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)
        await asyncio.sleep(interval_s)
