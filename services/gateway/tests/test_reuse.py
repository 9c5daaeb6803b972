"""Completed jobs are recorded in the reuse index (for ingest), and forgotten with their blobs."""

from __future__ import annotations

from typing import Any

import httpx

from stemflow_shared.events import JobOptions
from stemflow_shared.reuse import ResultIndex, result_key


def index_of(app: Any) -> ResultIndex:
    settings = app.state.settings
    return ResultIndex(app.state.redis, settings.redis_prefix, settings.result_reuse_ttl_s)


async def test_a_completed_job_is_reusable_by_fingerprint_and_options(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "reuse")
    job_id = await helpers.completed_job(app, client, alice, fingerprint="reuse-1", stems="2")
    options = JobOptions.model_validate((await app.state.jobs.repo.get(job_id))["options"])
    indexed = await index_of(app).lookup("reuse-1", options)
    assert indexed is not None and indexed.job_id == job_id
    assert {s.name for s in indexed.completed.stems} == {"vocals", "accompaniment"}
    assert indexed.separation is not None and indexed.separation.model == "htdemucs"
    assert indexed.separation.device == "cpu"
    assert await index_of(app).lookup("reuse-1", options.model_copy(update={"stems": 4})) is None
    key = f"{app.state.settings.redis_prefix}result:{result_key('reuse-1', options)}"
    ttl = await app.state.redis.ttl(key)
    assert 0 < ttl <= app.state.settings.result_reuse_ttl_s


async def test_an_unfinished_job_is_not_indexed(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "reuse")
    job = (await helpers.submit(client, alice)).json()
    await client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    options = JobOptions.model_validate(job["options"])
    assert await index_of(app).lookup("reuse-never", options) is None


async def test_deleting_the_job_forgets_its_results(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "reuse")
    job_id = await helpers.completed_job(app, client, alice, fingerprint="reuse-2")
    options = JobOptions.model_validate((await app.state.jobs.repo.get(job_id))["options"])
    assert await index_of(app).lookup("reuse-2", options) is not None
    assert (await client.delete(f"/v1/jobs/{job_id}", headers=alice)).status_code == 204
    assert await index_of(app).lookup("reuse-2", options) is None


async def test_a_newer_job_keeps_its_entry_when_an_older_one_goes(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "reuse")
    older = await helpers.completed_job(app, client, alice, fingerprint="reuse-3")
    newer = await helpers.completed_job(app, client, alice, fingerprint="reuse-3")
    options = JobOptions.model_validate((await app.state.jobs.repo.get(newer))["options"])
    assert (await client.delete(f"/v1/jobs/{older}", headers=alice)).status_code == 204
    indexed = await index_of(app).lookup("reuse-3", options)
    assert indexed is not None and indexed.job_id == newer


async def test_the_index_is_off_when_its_ttl_is_zero(base_env: dict[str, str], helpers: Any) -> None:
    async with helpers.running_app(base_env, result_reuse_ttl_s=0) as app, helpers.http_client(app) as client:
        alice = await helpers.new_key(app, "reuse-off")
        job_id = await helpers.completed_job(app, client, alice, fingerprint="reuse-off")
        options = JobOptions.model_validate((await app.state.jobs.repo.get(job_id))["options"])
        assert (
            await ResultIndex(app.state.redis, app.state.settings.redis_prefix, 60).lookup("reuse-off", options) is None
        )
