"""API keys on the real MongoDB: shown once, stored hashed, revocable; bearer parsing."""

from __future__ import annotations

from typing import Any

import pytest

from stemflow_shared.auth import COLLECTION, KEY_PREFIX, ApiKeys, bearer_token, hash_key


async def test_a_key_authenticates_its_owner_and_only_its_hash_is_stored(mongo_db: Any) -> None:
    keys = ApiKeys(mongo_db)
    key = await keys.create("alice", label="laptop")
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    stored = await mongo_db[COLLECTION].find_one({"owner": "alice", "label": "laptop"})
    assert stored["_id"] == hash_key(key) and key not in str(stored)
    who = await keys.authenticate(key)
    assert who is not None and who.owner == "alice" and who.key_id == hash_key(key)[:12]
    assert await keys.create("alice") != key


@pytest.mark.parametrize("token", [None, "", "sfk_", "sfk_unknown", "not-a-key", KEY_PREFIX + "x" * 300])
async def test_unknown_or_malformed_keys_authenticate_nobody(mongo_db: Any, token: str | None) -> None:
    assert await ApiKeys(mongo_db).authenticate(token) is None


async def test_a_revoked_key_stops_at_once_in_this_process(mongo_db: Any) -> None:
    keys = ApiKeys(mongo_db, cache_ttl_s=3600)
    key = await keys.create("bob")
    assert await keys.authenticate(key) is not None  # now cached
    assert await keys.revoke(key) is True
    assert await keys.authenticate(key) is None
    assert await keys.revoke(key) is False  # nothing left to revoke


async def test_another_process_sees_a_revocation_when_its_cache_expires(mongo_db: Any) -> None:
    writer, reader = ApiKeys(mongo_db), ApiKeys(mongo_db, cache_ttl_s=0)
    key = await writer.create("carol")
    assert await reader.authenticate(key) is not None
    await writer.revoke(key)
    assert await reader.authenticate(key) is None


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer sfk_abc", "sfk_abc"),
        ("bearer   sfk_abc  ", "sfk_abc"),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_tokens_are_read_from_the_authorization_header(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token
