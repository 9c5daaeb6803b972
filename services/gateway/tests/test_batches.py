"""Batches: several songs in one request, one id whose status aggregates its jobs."""

from __future__ import annotations

from typing import Any

import httpx

from stemflow_shared.events import INGEST_FAILED, ErrorInfo, StageFailed, make_event


def files(helpers: Any, count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"song-{i}.wav", helpers.wav_bytes(0.5 + i / 10), "audio/wav")) for i in range(count)]


def upload_blobs(app: Any) -> list[str]:
    root = app.state.jobs.blobs.root / "jobs"
    return sorted(p.parent.name for p in root.glob("*/upload")) if root.exists() else []


async def test_several_files_become_jobs_of_one_batch(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "batcher")
    answer = await client.post(
        "/v1/batches", headers=alice, files=files(helpers, 3), data={"stems": "2", "quality": "fast"}
    )
    assert answer.status_code == 202, answer.text
    batch = answer.json()
    assert answer.headers["location"].endswith(f"/v1/batches/{batch['id']}")
    assert batch["status"] == "queued" and batch["counts"] == {"queued": 3} and batch["progress"] == 0.0
    assert batch["links"]["events"].endswith(f"?batch_id={batch['id']}")
    assert [j["input"]["filename"] for j in batch["jobs"]] == ["song-0.wav", "song-1.wav", "song-2.wav"]
    assert len({j["input"]["sha256"] for j in batch["jobs"]}) == 3  # each file went to its own job
    for job in batch["jobs"]:
        assert job["batch_id"] == batch["id"] and job["options"]["stems"] == 2
        one = (await client.get(f"/v1/jobs/{job['id']}", headers=alice)).json()
        assert one["batch_id"] == batch["id"] and one["input"]["size"] == job["input"]["size"] > 0

    # The aggregate follows the jobs: one fails, one is cancelled, one is still queued...
    first, second, third = (j["id"] for j in batch["jobs"])
    failed = StageFailed(job_id=first, error=ErrorInfo(code="corrupt", message="bad"))
    await app.state.jobs.apply_event(make_event(INGEST_FAILED, failed, source="/t"))
    await client.post(f"/v1/jobs/{second}/cancel", headers=alice)
    now = (await client.get(f"/v1/batches/{batch['id']}", headers=alice)).json()
    assert now["counts"] == {"failed": 1, "cancelled": 1, "queued": 1} and now["status"] == "processing"
    # ...and when every job has ended with different outcomes, the batch is partial.
    await client.post(f"/v1/jobs/{third}/cancel", headers=alice)
    done = (await client.get(f"/v1/batches/{batch['id']}", headers=alice)).json()
    assert done["status"] == "partial" and done["counts"] == {"failed": 1, "cancelled": 2}


async def test_a_batch_of_urls(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "batcher")
    urls = ["https://example.com/a.mp3", "https://example.com/b.flac"]
    answer = await client.post("/v1/batches", headers=alice, json={"source_urls": urls, "analyze": False})
    assert answer.status_code == 202, answer.text
    batch = answer.json()
    assert [j["input"]["source_url"] for j in batch["jobs"]] == urls
    assert all(j["options"]["analyze"] is False for j in batch["jobs"])


async def test_job_events_name_their_batch(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "batcher")
    batch = (await client.post("/v1/batches", headers=alice, files=files(helpers, 1))).json()
    job_id = batch["jobs"][0]["id"]
    await client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
    doc = await app.state.jobs.repo.jobs.find_one({"_id": job_id})
    assert doc["batch_id"] == batch["id"]
    # The cancel's events went out through the outbox; rebuild them to check their payload.
    from gateway import lifecycle

    events = lifecycle._events_for(doc, True)
    assert {e.data.batch_id for e in events} == {batch["id"]}


async def test_bad_batches_are_refused_and_leave_no_file(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "refused-batcher")
    before = upload_blobs(app)
    helpers.assert_problem(
        await client.post("/v1/batches", headers=alice, data={"stems": "2"}, files=[("x", ("a", b"1", "text/plain"))]),
        422,
        "validation_failed",
    )
    mixed = [*files(helpers, 2), ("file", ("notes.txt", b"hello", "text/plain"))]
    helpers.assert_problem(await client.post("/v1/batches", headers=alice, files=mixed), 415, "unsupported_media_type")
    helpers.assert_problem(
        await client.post("/v1/batches", headers=alice, files=files(helpers, 2), data={"stems": "5"}),
        422,
        "validation_failed",
    )
    helpers.assert_problem(
        await client.post("/v1/batches", headers=alice, json={"source_urls": []}), 422, "validation_failed"
    )
    helpers.assert_problem(
        await client.post("/v1/batches", headers=alice, json={"source_urls": ["file:///etc/passwd"]}),
        422,
        "validation_failed",
    )
    assert upload_blobs(app) == before
    assert (await client.get("/v1/jobs", headers=alice)).json()["items"] == []


async def test_too_many_files_are_refused(base_env: dict[str, str], helpers: Any) -> None:
    async with helpers.running_app(base_env, batch_max_jobs=2) as small, helpers.http_client(small) as client:
        alice = await helpers.new_key(small, "batcher")
        before = upload_blobs(small)
        answer = await client.post("/v1/batches", headers=alice, files=files(helpers, 3))
        helpers.assert_problem(answer, 422, "validation_failed")
        assert upload_blobs(small) == before  # the two files streamed before the third was refused are gone
        assert not any((small.state.jobs.blobs.root / ".tmp").iterdir())


async def test_another_owner_cannot_see_a_batch(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "batcher")
    mallory = await helpers.new_key(app, "mallory")
    batch = (await client.post("/v1/batches", headers=alice, files=files(helpers, 1))).json()
    helpers.assert_problem(await client.get(f"/v1/batches/{batch['id']}", headers=mallory), 404, "batch_not_found")
    helpers.assert_problem(await client.get(f"/v1/batches/{batch['id']}"), 401, "unauthorized")
