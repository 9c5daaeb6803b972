"""The notifier asks the gateway (the owner of job state) and holds no MongoDB settings: the client against the
real gateway's internal API, its cache of API keys, and the notifier when the gateway cannot be asked."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from notifier.gateway_client import ExpiringCache, GatewayClient, GatewayUnavailable
from notifier.settings import Settings
from stemflow_shared.auth import new_api_key

SOURCE = Path(__file__).resolve().parents[1] / "src" / "notifier"


def client_of(gateway: Any, token: str, requests: list[str] | None = None, **cache: Any) -> GatewayClient:
    async def record(request: httpx.Request) -> None:
        if requests is not None:
            requests.append(request.url.path)

    http = httpx.AsyncClient(
        base_url=gateway.internal_url,
        headers={"Authorization": f"Bearer {token}"},
        event_hooks={"request": [record]},
    )
    return GatewayClient(http, **{"cache_ttl_s": 60.0, "cache_size": 100, "unknown_size": 100, **cache})


async def test_the_notifier_has_no_mongodb_settings_and_runs_without_them(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    assert not [name for name in Settings.model_fields if "mongo" in name]
    assert not [name for name in notifier_env if name.startswith("MONGODB")]
    assert not [path.name for path in SOURCE.glob("*.py") if "mongo" in path.read_text().lower()]
    key, job = await feed.key("no-mongo"), await feed.job("no-mongo")
    async with kit.running_notifier(notifier_env, replica_id=kit.replica("no-mongo")) as notifier:
        async with httpx.AsyncClient() as http:
            checks = (await http.get(f"{notifier.http_url}/readyz")).json()["checks"]
        assert checks == {"gateway": True, "redis": True, "broker": True}
        async with kit.connect(notifier.url, key) as ws:
            assert (await kit.subscribe(ws, job_id=job))["state"]["id"] == job


async def test_the_client_reads_keys_jobs_and_batches(gateway: Any, feed: Any) -> None:
    client = client_of(gateway, "notifier-tests-internal-token")
    key = await feed.key("reader")
    job = await feed.job("reader", callback_url="https://hooks.example.com/x")
    assert (await client.principal(key)).owner == "reader"
    assert await client.principal(new_api_key()) is None
    assert await client.principal("not-a-key") is None
    record = await client.job("reader", job)
    assert record is not None and record.callback_url == "https://hooks.example.com/x" and record.job.id == job
    assert await client.job("someone-else", job) is None
    assert [state["id"] for state in await client.unfinished_jobs("reader", 10)] == [job]
    assert await client.batch_jobs("reader", "0" * 32) is None
    assert await client.ready()


async def test_the_gateway_s_answers_leave_no_cycles_behind(gateway: Any, feed: Any) -> None:
    """What a middle collection catches in flight is frozen (notifier.heap): a cycle in it would never be freed."""
    client = client_of(gateway, "notifier-tests-internal-token", cache_ttl_s=0.0)
    key, job = await feed.key("acyclic"), await feed.job("acyclic")
    assert (await client.principal(key)).owner == "acyclic"  # the pool holds a connection from now on
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        assert (await client.principal(key)).owner == "acyclic"
        assert await client.principal(new_api_key()) is None
        assert (await client.job("acyclic", job)) is not None
        assert await client.job("someone-else", job) is None  # a 404
        assert [state["id"] for state in await client.unfinished_jobs("acyclic", 10)] == [job]
        gc.collect()
        cyclic = {
            type(obj).__qualname__ for obj in gc.garbage if type(obj).__module__.startswith(("httpx", "httpcore"))
        }
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == set()


async def test_a_key_is_asked_once_however_many_ask_at_once(gateway: Any, feed: Any) -> None:
    requests: list[str] = []
    client = client_of(gateway, "notifier-tests-internal-token", requests)
    key = await feed.key("storm")
    answers = await asyncio.gather(*(client.principal(key) for _ in range(50)))
    assert {answer.owner for answer in answers} == {"storm"}
    await feed.revoke(key)
    assert (await client.principal(key)).owner == "storm"  # remembered for the cache time
    unknown = new_api_key()
    assert [await client.principal(unknown) for _ in range(5)] == [None] * 5
    assert requests == ["/internal/v1/principals"] * 2


async def test_without_a_cache_every_lookup_asks(gateway: Any, feed: Any) -> None:
    requests: list[str] = []
    client = client_of(gateway, "notifier-tests-internal-token", requests, cache_ttl_s=0.0)
    key = await feed.key("uncached")
    assert (await client.principal(key)).owner == "uncached"
    await feed.revoke(key)
    assert await client.principal(key) is None
    assert len(requests) == 2


def test_the_cache_keeps_at_most_its_size_and_forgets_the_oldest() -> None:
    cache = ExpiringCache(ttl_s=60.0, size=3)
    for n in range(10):
        cache.put(f"k{n}", None)
    assert len(cache) == 3
    assert cache.get("k6") == (False, None) and cache.get("k9") == (True, None)
    expired = ExpiringCache(ttl_s=-1.0, size=3)
    expired.put("k", None)
    assert len(expired) == 0


async def test_a_wrong_token_is_an_outage_not_an_unknown_key(gateway: Any, feed: Any) -> None:
    client = client_of(gateway, "wrong-token")
    with pytest.raises(GatewayUnavailable, match="HTTP 401"):
        await client.principal(await feed.key("wrong-token"))
    assert not await client.ready()


async def test_without_the_gateway_keys_are_refused_with_503_and_the_notifier_is_not_ready(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
    env = {**notifier_env, "GATEWAY_INTERNAL_URL": nowhere}
    key = await feed.key("stranded")
    async with kit.running_notifier(env, replica_id=kit.replica("stranded"), ready=False) as notifier:
        async with httpx.AsyncClient() as http:
            readiness = await http.get(f"{notifier.http_url}/readyz")
        assert readiness.status_code == 503 and readiness.json()["checks"]["gateway"] is False
        with pytest.raises(InvalidStatus) as refused:
            async with kit.connect(notifier.url, key):
                pass
        assert refused.value.response.status_code == 503
        assert json.loads(refused.value.response.body)["code"] == "unavailable"
