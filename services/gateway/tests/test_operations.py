"""Operational behaviour driven by settings: rate limits, slow-command monitoring, pools, GZip, errors."""

from __future__ import annotations

import gzip
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from gateway.mongo_monitoring import SlowCommandLogger
from stemflow_shared import metrics

RATE_LIMIT = 5
TUNED = {
    "rate_limit_per_minute": RATE_LIMIT,
    "slow_mongodb_command_ms": 0.001,
    "mongodb_max_pool_size": 7,
    "mongodb_min_pool_size": 1,
    "redis_max_connections": 9,
}


@pytest_asyncio.fixture(scope="module")
async def tuned(base_env: dict[str, str], helpers: Any) -> AsyncIterator[Any]:
    """A gateway with a tiny rate limit, every MongoDB command 'slow', small pools, and a route that raises."""
    async with helpers.running_app(base_env, **TUNED) as app:

        async def boom() -> None:
            raise RuntimeError("a bug")

        app.router.add_api_route("/v1/boom", boom, methods=["GET"])
        yield app


@pytest_asyncio.fixture(scope="module")
async def client(tuned: Any, helpers: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with helpers.http_client(tuned, raise_app_exceptions=False) as c:
        yield c


async def test_a_key_over_its_limit_gets_429_with_retry_after(
    tuned: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice, bob = await helpers.new_key(tuned, "alice"), await helpers.new_key(tuned, "bob")
    job = (await helpers.submit(client, alice)).json()
    # Every route counts, the cached job read included (it counts in the same Redis call as its read).
    for url in (f"/v1/jobs/{job['id']}", "/v1/jobs", f"/v1/jobs/{job['id']}", "/v1/jobs"):
        assert (await client.get(url, headers=alice)).status_code == 200
    for url in (f"/v1/jobs/{job['id']}", "/v1/jobs"):
        limited = await client.get(url, headers=alice)
        helpers.assert_problem(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert (await client.get("/v1/jobs", headers=bob)).status_code == 200


async def test_slow_mongodb_commands_are_counted_and_logged(
    tuned: Any, client: httpx.AsyncClient, helpers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    counter = metrics.MONGODB_SLOW_COMMANDS.labels("find")
    before = counter._value.get()
    carol = await helpers.new_key(tuned, "carol")
    with caplog.at_level(logging.WARNING, logger="gateway"):
        assert (await client.get("/v1/jobs", headers=carol)).status_code == 200
    assert counter._value.get() > before
    assert any("slow MongoDB command find" in r.getMessage() for r in caplog.records)


def test_the_slow_command_threshold_comes_from_settings(tuned: Any) -> None:
    listeners = tuned.state.mongo.options.event_listeners
    assert [listener.threshold_ms for listener in listeners if isinstance(listener, SlowCommandLogger)] == [0.001]


def test_pool_sizes_come_from_settings(tuned: Any) -> None:
    pool = tuned.state.mongo.options.pool_options
    assert (pool.max_pool_size, pool.min_pool_size) == (7, 1)
    assert tuned.state.redis.connection_pool.max_connections == 9


async def test_responses_over_1kb_are_gzipped_and_smaller_ones_are_not(
    tuned: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    dave = await helpers.new_key(tuned, "dave")
    for _ in range(3):
        await helpers.submit(client, dave)
    accept = {**dave, "Accept-Encoding": "gzip"}
    async with client.stream("GET", "/v1/jobs", headers=accept) as listed:
        raw = b"".join([chunk async for chunk in listed.aiter_raw()])
    assert listed.headers["content-encoding"] == "gzip"
    assert len(gzip.decompress(raw)) > 1024
    small = await client.get("/healthz", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers and len(small.content) < 1024


async def test_every_response_says_how_long_it_took(client: httpx.AsyncClient, helpers: Any, tuned: Any) -> None:
    erin = await helpers.new_key(tuned, "erin")
    for response in (
        await client.get("/healthz"),
        await client.get("/v1/jobs", headers=erin),
        await client.get("/v1/jobs/nope", headers=erin),
        await client.get("/v1/jobs"),
    ):
        value = response.headers["x-response-time"]
        assert value.endswith("ms") and float(value[:-2]) >= 0


async def test_framework_errors_and_crashes_are_problem_details(
    tuned: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    frank = await helpers.new_key(tuned, "frank")
    helpers.assert_problem(await client.get("/nowhere"), 404, "not_found")
    helpers.assert_problem(await client.get("/v1/jobs/abc", headers=frank), 404, "job_not_found")
    helpers.assert_problem(await client.patch("/v1/jobs", headers=frank), 405, "method_not_allowed")
    crashed = await client.get("/v1/boom")
    body = helpers.assert_problem(crashed, 500, "internal_error")
    assert "a bug" not in crashed.text and body["instance"] == "/v1/boom"


async def test_openapi_docs_are_served(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/jobs/{job_id}/stems/{stem}" in schema["paths"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
