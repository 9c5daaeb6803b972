"""Retention and clean-up: expired jobs go with every blob, failed uploads leave no file behind."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx

from gateway import lifecycle


def blob_files(app: Any, job_id: str) -> list[str]:
    root = app.state.jobs.blobs.root
    return sorted(str(p.relative_to(root)) for p in (root / "jobs" / job_id).rglob("*") if p.is_file())


def temp_files(app: Any) -> list[str]:
    return [p.name for p in (app.state.jobs.blobs.root / ".tmp").iterdir()]


async def test_the_sweeper_removes_expired_jobs_with_all_their_blobs(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "retention")
    expired = await helpers.completed_job(app, client, alice, fingerprint="retention-expired")
    kept = await helpers.completed_job(app, client, alice, fingerprint="retention-kept")
    assert len(blob_files(app, expired)) == 3  # the upload and two stems
    assert (await client.get(f"/v1/jobs/{expired}", headers=alice)).status_code == 200  # now cached too
    past = lifecycle.utcnow() - timedelta(seconds=1)
    await app.state.jobs.repo.jobs.update_one({"_id": expired}, {"$set": {"expire_at": past}})

    assert await app.state.jobs.collect_expired() == 1

    assert await app.state.jobs.repo.get(expired) is None
    assert blob_files(app, expired) == []
    helpers.assert_problem(await client.get(f"/v1/jobs/{expired}", headers=alice), 404, "job_not_found")
    assert len(blob_files(app, kept)) == 3
    assert (await client.get(f"/v1/jobs/{kept}", headers=alice)).status_code == 200


async def test_jobs_carry_their_expiry_and_a_ttl_index_backs_the_sweeper(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "retention")
    job = (await helpers.submit(client, alice)).json()
    doc = await app.state.jobs.repo.get(job["id"])
    retention = timedelta(hours=app.state.settings.job_retention_hours)
    assert doc["expire_at"] - doc["created_at"] == retention
    indexes = await app.state.jobs.repo.jobs.index_information()
    assert indexes["expiry"]["key"] == [("expire_at", 1)] and "expireAfterSeconds" in indexes["expiry"]


async def test_failed_uploads_leave_no_file_behind(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "uploader")
    too_big = {"file": ("big.wav", b"\0" * 2_100_000, "audio/wav")}
    helpers.assert_problem(await client.post("/v1/jobs", headers=alice, files=too_big), 413, "payload_too_large")
    wrong_type = {"file": ("a.txt", b"hello", "text/plain")}
    helpers.assert_problem(
        await client.post("/v1/jobs", headers=alice, files=wrong_type), 415, "unsupported_media_type"
    )
    helpers.assert_problem(await helpers.submit(client, alice, stems="5"), 422, "validation_failed")
    broken = {**alice, "Content-Type": "multipart/form-data; boundary=xyz"}
    body = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nabc\r\n--nope'
    cut_short = await client.post("/v1/jobs", headers=broken, content=body)
    helpers.assert_problem(cut_short, 400, "malformed_multipart")
    assert temp_files(app) == []
    assert (await client.get("/v1/jobs", headers=alice)).json()["items"] == []
    for upload in (app.state.jobs.blobs.root / "jobs").glob("*/upload"):
        assert await app.state.jobs.repo.get(upload.parent.name) is not None, upload
