"""The internal API (gateway/internal.py): only with the service token, only on its own port, jobs as the
public API renders them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio
import uvicorn

from gateway.internal import internal_app
from gateway.main import create_app
from gateway.settings import Settings
from stemflow_shared.internal import (
    JOBS_PATH,
    PING_PATH,
    PRINCIPALS_PATH,
    BatchRecord,
    JobList,
    JobRecord,
    Principal,
    batch_path,
    job_path,
)

TOKEN = "internal-test-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest_asyncio.fixture(scope="module")
async def gateway(helpers: Any, base_env: dict[str, str]) -> AsyncIterator[Any]:
    async with helpers.running_app(base_env, internal_token=TOKEN) as application:
        yield application


@pytest_asyncio.fixture(scope="module")
async def public(helpers: Any, gateway: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with helpers.http_client(gateway) as client:
        yield client


@pytest_asyncio.fixture(scope="module")
async def internal(gateway: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=internal_app(gateway.state))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway-internal") as client:
        yield client


async def test_every_route_refuses_a_request_without_the_right_token(helpers: Any, internal: Any) -> None:
    requests = [
        ("GET", PING_PATH, None),
        ("POST", PRINCIPALS_PATH, {"api_key": "sfk_x"}),
        ("GET", job_path("0" * 32), None),
        ("GET", JOBS_PATH, None),
        ("GET", batch_path("0" * 32), None),
    ]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for method, path, body in requests:
            response = await internal.request(method, path, headers=headers, json=body, params={"owner": "o"})
            helpers.assert_problem(response, 401, "unauthorized")
    assert (await internal.get(PING_PATH, headers=BEARER)).status_code == 204


async def test_without_a_configured_token_everything_is_refused(helpers: Any, base_env: dict[str, str]) -> None:
    async with helpers.running_app(base_env) as application:
        transport = httpx.ASGITransport(app=internal_app(application.state))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway-internal") as client:
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
                helpers.assert_problem(await client.get(PING_PATH, headers=headers), 401, "unauthorized")


async def test_an_api_key_names_its_owner_until_revoked(helpers: Any, gateway: Any, internal: Any) -> None:
    key = (await helpers.new_key(gateway, "ivy"))["Authorization"].removeprefix("Bearer ")
    response = await internal.post(PRINCIPALS_PATH, headers=BEARER, json={"api_key": key})
    assert response.status_code == 200
    assert Principal.model_validate(response.json()).owner == "ivy"
    await gateway.state.api_keys.revoke(key)
    for unknown in (key, "sfk_unknown", "not-a-key"):
        response = await internal.post(PRINCIPALS_PATH, headers=BEARER, json={"api_key": unknown})
        helpers.assert_problem(response, 404, "principal_not_found")
    helpers.assert_problem(await internal.post(PRINCIPALS_PATH, headers=BEARER, json={}), 422, "validation_failed")


async def test_a_job_is_the_public_document_with_owner_and_callback(
    helpers: Any, gateway: Any, public: Any, internal: Any
) -> None:
    headers = await helpers.new_key(gateway, "jack")
    hook = "https://hooks.example.com/stemflow"
    job_id = (await helpers.submit(public, headers, callback_url=hook)).json()["id"]
    response = await internal.get(job_path(job_id), headers=BEARER, params={"owner": "jack"})
    record = JobRecord.model_validate(response.json())
    assert record.owner == "jack" and record.callback_url == hook
    assert response.json()["job"] == (await public.get(f"/v1/jobs/{job_id}", headers=headers)).json()
    for owner in ("someone-else", ""):
        response = await internal.get(job_path(job_id), headers=BEARER, params={"owner": owner})
        assert response.status_code in (404, 422)
    helpers.assert_problem(await internal.get(job_path(job_id), headers=BEARER), 422, "validation_failed")


async def test_an_owners_unfinished_jobs_newest_first(helpers: Any, gateway: Any, public: Any, internal: Any) -> None:
    headers = await helpers.new_key(gateway, "kim")
    ids = [(await helpers.submit(public, headers)).json()["id"] for _ in range(3)]
    done = await helpers.completed_job(gateway, public, headers)
    await helpers.submit(public, await helpers.new_key(gateway, "not-kim"))
    unfinished = await internal.get(JOBS_PATH, headers=BEARER, params={"owner": "kim", "unfinished": "true"})
    assert [job.id for job in JobList.model_validate(unfinished.json()).jobs] == ids[::-1]
    limited = await internal.get(JOBS_PATH, headers=BEARER, params={"owner": "kim", "limit": 2})
    assert [job.id for job in JobList.model_validate(limited.json()).jobs] == [done, ids[-1]]


async def test_a_batch_is_its_jobs_in_submission_order(helpers: Any, gateway: Any, public: Any, internal: Any) -> None:
    headers = await helpers.new_key(gateway, "lou")
    files = [("file", (f"{n}.wav", helpers.wav_bytes(), "audio/wav")) for n in range(3)]
    batch = (await public.post("/v1/batches", headers=headers, files=files)).json()
    response = await internal.get(batch_path(batch["id"]), headers=BEARER, params={"owner": "lou"})
    record = BatchRecord.model_validate(response.json())
    assert [job.id for job in record.jobs] == [job["id"] for job in batch["jobs"]]
    assert {job.status for job in record.jobs} == {"queued"}
    other = await internal.get(batch_path(batch["id"]), headers=BEARER, params={"owner": "not-lou"})
    helpers.assert_problem(other, 404, "batch_not_found")


async def test_served_on_its_own_port_never_the_public_one(base_env: dict[str, str]) -> None:
    """The gateway as a server: the internal port answers with the token; the API port knows no such route."""
    env = {k.lower(): v for k, v in base_env.items()}
    settings = Settings(**{**env, "internal_token": TOKEN, "internal_port": 0, "metrics_port": 0})
    async with serving(create_app(settings)) as (api_port, internal_port), httpx.AsyncClient(timeout=10) as http:
        assert internal_port not in (None, api_port)
        ping = f"http://127.0.0.1:{internal_port}{PING_PATH}"
        assert (await http.get(ping, headers=BEARER)).status_code == 204
        assert (await http.get(ping)).status_code == 401
        assert (await http.get(f"http://127.0.0.1:{api_port}{PING_PATH}", headers=BEARER)).status_code == 404


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[tuple[int, int | None]]:
    """The app under uvicorn on a free port, its lifespan run through its middleware; the API and internal ports."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(30):
            while not server.started:
                await asyncio.wait({task}, timeout=0.05)  # returns at once if the server failed to start
                assert not task.done(), "the gateway did not start"
        yield sock.getsockname()[1], _internal_port(app)
    finally:
        server.should_exit = True
        await task


def _internal_port(app: Any) -> int | None:
    """The bound port of the app's InternalPort middleware."""
    layer = app.middleware_stack
    while layer is not None:
        if type(layer).__name__ == "InternalPort":
            return layer.bound_port
        layer = getattr(layer, "app", None)
    return None
