"""API keys: random tokens shown once, stored only as SHA-256 hashes, looked up by hash."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

KEY_PREFIX = "sfk_"
COLLECTION = "api_keys"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough; a slow KDF would only add latency.
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    owner: str
    key_id: str


class ApiKeys:
    """The `api_keys` collection, with a short in-process cache of positive lookups."""

    def __init__(self, database: Any, cache_ttl_s: float = 30.0) -> None:
        self._collection = database[COLLECTION]
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[float, Principal]] = {}

    async def create(self, owner: str, label: str = "") -> str:
        """Store a new key for `owner` and return it; it is never readable again."""
        key = new_api_key()
        await self._collection.insert_one(
            {"_id": hash_key(key), "owner": owner, "label": label, "created_at": datetime.now(UTC), "revoked": False}
        )
        return key

    async def authenticate(self, key: str | None) -> Principal | None:
        """The principal of a valid, unrevoked key, else None."""
        if not key or not key.startswith(KEY_PREFIX) or len(key) > 200:
            return None
        digest = hash_key(key)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        doc = await self._collection.find_one({"_id": digest, "revoked": False}, {"owner": 1})
        if doc is None:
            self._cache.pop(digest, None)
            return None
        principal = Principal(owner=doc["owner"], key_id=digest[:12])
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + self._ttl, principal)
        return principal

    async def revoke(self, key: str) -> bool:
        digest = hash_key(key)
        self._cache.pop(digest, None)
        result = await self._collection.update_one({"_id": digest}, {"$set": {"revoked": True}})
        return result.modified_count == 1


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
