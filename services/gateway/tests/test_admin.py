"""The admin command creates and revokes API keys, stored hashed."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from stemflow_shared.auth import ApiKeys, hash_key


def admin(base_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.admin", *args],
        env={**os.environ, **base_env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_create_authenticate_and_revoke_a_key(base_env: dict[str, str], mongo_db: Any) -> None:
    created = admin(base_env, "create-key", "--owner", "ops-team", "--label", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    keys = ApiKeys(mongo_db, cache_ttl_s=0)
    assert (await keys.authenticate(key)).owner == "ops-team"
    stored = await mongo_db["api_keys"].find_one({"_id": hash_key(key)})
    assert stored["label"] == "ci" and key not in str(stored)

    assert admin(base_env, "revoke-key", key).returncode == 0
    assert await keys.authenticate(key) is None
    again = admin(base_env, "revoke-key", key)
    assert again.returncode == 1 and "no such key" in again.stderr
