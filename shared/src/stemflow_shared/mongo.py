"""MongoDB readiness, checked one way by every service that holds a MongoDB client (gateway, GridFS blobs)."""

from __future__ import annotations

from typing import Any


async def mongodb_ready(database: Any) -> bool:
    """True when the server answers `ping` on this database's connection (raises when it cannot)."""
    await database.command("ping")
    return True
