"""The public job API against real MongoDB and Redis."""

from __future__ import annotations

import asyncio
import gzip
import io
import zipfile
from typing import Any

import httpx
import pytest

from gateway import lifecycle
from stemflow_shared.events import ANALYSIS_COMPLETED, AnalysisCompleted, AnalysisResult, make_event
from stemflow_shared.metrics import REGISTRY


async def assert_no_orphan_uploads(app: Any) -> None:
    """Every uploaded file on disk belongs to a job that exists."""
    uploads = list((app.state.jobs.blobs.root / "jobs").glob("*/upload"))
    assert uploads
    for path in uploads:
        assert await app.state.jobs.repo.get(path.parent.name) is not None, path


async def test_upload_is_accepted_with_the_job_and_its_location(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    headers = await helpers.new_key(app, "alice")
    response = await helpers.submit(client, headers, stems="2", quality="fast", output_format="flac")
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    assert job["status"] == "queued"
    assert job["options"]["stems"] == 2 and job["options"]["output_format"] == "flac"
    assert job["input"]["filename"] == "song.wav"
    assert job["input"]["size"] == len(helpers.wav_bytes())
    import hashlib

    assert job["input"]["sha256"] == hashlib.sha256(helpers.wav_bytes()).hexdigest()
    assert set(job["links"]) == {"self", "events", "stems_zip", "analysis"}
    blob = await app.state.jobs.blobs.size(f"jobs/{job['id']}/upload")
    assert blob == len(helpers.wav_bytes())


async def test_get_uses_etags_and_another_owner_sees_nothing(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice, mallory = await helpers.new_key(app, "alice"), await helpers.new_key(app, "mallory")
    job = (await helpers.submit(client, alice)).json()
    first = await client.get(f"/v1/jobs/{job['id']}", headers=alice)
    assert first.status_code == 200 and first.json()["id"] == job["id"]
    again = await client.get(f"/v1/jobs/{job['id']}", headers={**alice, "If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    helpers.assert_problem(await client.get(f"/v1/jobs/{job['id']}", headers=mallory), 404, "job_not_found")
    helpers.assert_problem(await client.post(f"/v1/jobs/{job['id']}/cancel", headers=mallory), 404, "job_not_found")
    helpers.assert_problem(await client.delete(f"/v1/jobs/{job['id']}", headers=mallory), 404, "job_not_found")


async def test_cached_reads_answer_gzip_identity_and_304_alike(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice, mallory = await helpers.new_key(app, "alice"), await helpers.new_key(app, "mallory")
    job = (await helpers.submit(client, alice)).json()
    url = f"/v1/jobs/{job['id']}"
    async with client.stream("GET", url, headers={**alice, "Accept-Encoding": "gzip"}) as zipped:
        raw = b"".join([chunk async for chunk in zipped.aiter_raw()])
    plain = await client.get(url, headers={**alice, "Accept-Encoding": "identity"})
    assert zipped.headers["content-encoding"] == "gzip" and "content-encoding" not in plain.headers
    assert gzip.decompress(raw) == plain.content and plain.json()["id"] == job["id"]
    assert zipped.headers["etag"] == plain.headers["etag"] and plain.headers["vary"].lower() == "accept-encoding"
    not_modified = await client.get(url, headers={**alice, "If-None-Match": f'W/"x", {plain.headers["etag"]}'})
    assert not_modified.status_code == 304 and not_modified.content == b""
    helpers.assert_problem(await client.get(url, headers=mallory), 404, "job_not_found")
    helpers.assert_problem(await client.get(url), 401, "unauthorized")


async def test_the_cache_follows_every_transition(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "alice")
    job = (await helpers.submit(client, alice)).json()
    before = await client.get(f"/v1/jobs/{job['id']}", headers=alice)
    await client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    after = await client.get(f"/v1/jobs/{job['id']}", headers=alice)
    assert after.json()["status"] == "cancelled"
    assert after.headers["etag"] != before.headers["etag"]
    stale = await client.get(f"/v1/jobs/{job['id']}", headers={**alice, "If-None-Match": before.headers["etag"]})
    assert stale.status_code == 200


async def test_idempotency_key_returns_the_same_job(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice, bob = await helpers.new_key(app, "alice"), await helpers.new_key(app, "bob")
    replays = REGISTRY.get_sample_value("stemflow_dedup_hits_total", {"kind": "idempotency_key"}) or 0.0
    first = await helpers.submit(client, {**alice, "Idempotency-Key": "abc-1"})
    second = await helpers.submit(client, {**alice, "Idempotency-Key": "abc-1"})
    other = await helpers.submit(client, {**bob, "Idempotency-Key": "abc-1"})
    assert first.json()["id"] == second.json()["id"]
    assert other.json()["id"] != first.json()["id"]
    assert REGISTRY.get_sample_value("stemflow_dedup_hits_total", {"kind": "idempotency_key"}) == replays + 1


async def test_concurrent_idempotent_submissions_make_one_job(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "carol")
    replays = REGISTRY.get_sample_value("stemflow_dedup_hits_total", {"kind": "idempotency_key"}) or 0.0
    responses = await asyncio.gather(*(helpers.submit(client, {**alice, "Idempotency-Key": "race"}) for _ in range(5)))
    assert len({r.json()["id"] for r in responses}) == 1
    # Every submission but the one that made the job counts as a replay, however the race was lost.
    assert REGISTRY.get_sample_value("stemflow_dedup_hits_total", {"kind": "idempotency_key"}) == replays + 4
    listed = (await client.get("/v1/jobs", headers=alice)).json()["items"]
    assert len(listed) == 1
    await assert_no_orphan_uploads(app)


async def test_json_source_url_submission(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "alice")
    response = await client.post(
        "/v1/jobs", headers=alice, json={"source_url": "https://example.com/a.mp3", "stems": 4}
    )
    assert response.status_code == 202
    assert response.json()["input"]["source_url"] == "https://example.com/a.mp3"
    body = helpers.assert_problem(
        await client.post("/v1/jobs", headers=alice, json={"source_url": "file:///etc/passwd"}),
        422,
        "validation_failed",
    )
    assert body["errors"][0]["field"] == "source_url"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"stems": "3"}, "stems"),
        ({"model": "spleeter"}, "model"),
        ({"output_format": "ogg"}, "output_format"),
        ({"trim_start": "-1"}, "trim_start"),
        ({"quality": "ultra"}, "quality"),
    ],
)
async def test_invalid_options_are_422_naming_the_field_and_leave_no_file(
    app: Any, client: httpx.AsyncClient, fields: dict[str, str], field: str, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "dave")
    body = helpers.assert_problem(await helpers.submit(client, alice, **fields), 422, "validation_failed")
    assert field in {e["field"] for e in body["errors"]}
    assert (await client.get("/v1/jobs", headers=alice)).json()["items"] == []
    await assert_no_orphan_uploads(app)


async def test_reversed_trims_are_rejected(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "alice")
    helpers.assert_problem(await helpers.submit(client, alice, trim_start="10", trim_end="5"), 422, "validation_failed")


async def test_limits_and_media_types(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "alice")
    big = {"file": ("big.wav", b"\0" * 2_100_000, "audio/wav")}
    helpers.assert_problem(await client.post("/v1/jobs", headers=alice, files=big), 413, "payload_too_large")
    text = {"file": ("notes.txt", b"hello", "text/plain")}
    helpers.assert_problem(await client.post("/v1/jobs", headers=alice, files=text), 415, "unsupported_media_type")
    helpers.assert_problem(
        await client.post("/v1/jobs", headers={**alice, "Content-Type": "text/plain"}, content=b"x"),
        415,
        "unsupported_media_type",
    )
    helpers.assert_problem(
        await client.post("/v1/jobs", headers=alice, files={"other": ("a", b"x", "audio/wav")}),
        422,
        "validation_failed",
    )


async def test_authentication_and_framework_errors_are_problems(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    helpers.assert_problem(await client.get("/v1/jobs"), 401, "unauthorized")
    helpers.assert_problem(
        await client.get("/v1/jobs", headers={"Authorization": "Bearer sfk_nope"}), 401, "unauthorized"
    )
    alice = await helpers.new_key(app, "alice")
    helpers.assert_problem(await client.get("/v1/nowhere", headers=alice), 404, "not_found")
    helpers.assert_problem(await client.put("/v1/jobs", headers=alice), 405, "method_not_allowed")
    helpers.assert_problem(await client.get("/v1/jobs?limit=0", headers=alice), 422, "validation_failed")
    helpers.assert_problem(await client.get("/v1/jobs?cursor=zzz", headers=alice), 422, "validation_failed")


async def test_listing_is_newest_first_without_gaps_or_duplicates_while_inserting(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    erin = await helpers.new_key(app, "erin")
    created = [(await helpers.submit(client, erin)).json()["id"] for _ in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        url = "/v1/jobs?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = (await client.get(url, headers=erin)).json()
        seen.extend(item["id"] for item in page["items"])
        await helpers.submit(client, erin)  # a newer job must not shift later pages
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(created))
    cancelled = (await client.post(f"/v1/jobs/{created[0]}/cancel", headers=erin)).json()
    assert cancelled["status"] == "cancelled"
    only = (await client.get("/v1/jobs?status=cancelled", headers=erin)).json()["items"]
    assert [i["id"] for i in only] == [created[0]]


async def test_cancel_is_idempotent_and_delete_removes_job_and_files(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "alice")
    job = (await helpers.submit(client, alice)).json()
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)).status_code == 200
    again = await client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert (await client.delete(f"/v1/jobs/{job['id']}", headers=alice)).status_code == 204
    helpers.assert_problem(await client.get(f"/v1/jobs/{job['id']}", headers=alice), 404, "job_not_found")
    assert not await app.state.jobs.blobs.exists(f"jobs/{job['id']}/upload")


async def test_stem_download_with_ranges_and_streamed_zip(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "alice")
    job_id = await helpers.completed_job(app, client, alice)
    job = (await client.get(f"/v1/jobs/{job_id}", headers=alice)).json()
    assert job["status"] == "completed"
    assert {s["name"] for s in job["result"]["stems"]} == {"vocals", "accompaniment"}
    full = await client.get(f"/v1/jobs/{job_id}/stems/vocals", headers=alice)
    assert full.status_code == 200 and full.content == bytes(range(256)) * 40
    part = await client.get(f"/v1/jobs/{job_id}/stems/vocals", headers={**alice, "Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == bytes(range(10, 20))
    assert part.headers["content-range"] == f"bytes 10-19/{256 * 40}"
    tail = await client.get(f"/v1/jobs/{job_id}/stems/vocals", headers={**alice, "Range": "bytes=-5"})
    assert tail.content == bytes(range(251, 256))
    helpers.assert_problem(
        await client.get(f"/v1/jobs/{job_id}/stems/vocals", headers={**alice, "Range": "bytes=99999-"}),
        416,
        "range_not_satisfiable",
    )
    helpers.assert_problem(await client.get(f"/v1/jobs/{job_id}/stems/drums", headers=alice), 404, "stem_not_found")
    archive = await client.get(f"/v1/jobs/{job_id}/stems.zip", headers=alice)
    with zipfile.ZipFile(io.BytesIO(archive.content)) as z:
        assert sorted(z.namelist()) == ["accompaniment.wav", "vocals.wav"]
        assert z.read("vocals.wav") == bytes(range(256)) * 40
    helpers.assert_problem(await client.get(f"/v1/jobs/{job_id}/analysis", headers=alice), 409, "analysis_not_ready")
    helpers.assert_problem(await client.post(f"/v1/jobs/{job_id}/cancel", headers=alice), 409, "job_finished")


async def test_a_reader_late_with_an_old_copy_cannot_bring_a_deleted_job_back(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "alice")
    job = (await helpers.submit(client, alice)).json()
    old_copy = await app.state.jobs.repo.get(job["id"])
    assert (await client.delete(f"/v1/jobs/{job['id']}", headers=alice)).status_code == 204
    await app.state.jobs.remember(old_copy)  # e.g. a GET that read MongoDB just before the delete
    helpers.assert_problem(await client.get(f"/v1/jobs/{job['id']}", headers=alice), 404, "job_not_found")
    assert job["id"] not in {i["id"] for i in (await client.get("/v1/jobs", headers=alice)).json()["items"]}


async def test_downloads_and_analysis_of_another_owner_are_not_found(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice, mallory = await helpers.new_key(app, "alice"), await helpers.new_key(app, "mallory")
    job_id = await helpers.completed_job(app, client, alice)
    for path in ("stems/vocals", "stems.zip", "analysis"):
        helpers.assert_problem(await client.get(f"/v1/jobs/{job_id}/{path}", headers=mallory), 404, "job_not_found")


async def test_analysis_is_the_full_document_with_beats(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "alice")
    job = (await helpers.submit(client, alice, separate="false")).json()
    beats = [round(0.5 * i, 3) for i in range(400)]
    analysis = AnalysisResult(
        tempo_bpm=120,
        tempo_confidence=0.9,
        key="A minor",
        key_confidence=0.8,
        loudness_lufs=-9,
        true_peak_dbfs=-0.5,
        rms_dbfs=-12,
        duration_s=200,
        beat_count=len(beats),
        beats=beats,
    )
    await app.state.jobs.apply_event(
        make_event(ANALYSIS_COMPLETED, AnalysisCompleted(job_id=job["id"], analysis=analysis), source="/t")
    )
    full = await client.get(f"/v1/jobs/{job['id']}/analysis", headers=alice)
    assert full.status_code == 200 and full.json()["beats"] == beats and full.json()["key"] == "A minor"
    summary = (await client.get(f"/v1/jobs/{job['id']}", headers=alice)).json()["result"]["analysis"]
    assert summary["beat_count"] == 400 and "beats" not in summary


async def test_json_submissions_are_bounded_and_must_be_json(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "alice")
    huge = b'{"source_url": "https://example.com/a.mp3", "pad": "' + b"x" * 70_000 + b'"}'
    headers = {**alice, "Content-Type": "application/json"}
    helpers.assert_problem(await client.post("/v1/jobs", headers=headers, content=huge), 413, "payload_too_large")
    helpers.assert_problem(await client.post("/v1/jobs", headers=headers, content=b"{nope"), 400, "malformed_json")


async def test_unfinished_jobs_have_no_downloads(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "alice")
    job = (await helpers.submit(client, alice)).json()
    helpers.assert_problem(await client.get(f"/v1/jobs/{job['id']}/stems.zip", headers=alice), 409, "job_not_completed")


async def test_ops_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and all(ready.json()["checks"].values())
    assert (await client.get("/metrics")).status_code == 404  # served on METRICS_PORT (test_edge.py)
    assert (await client.get("/openapi.json")).json()["info"]["title"] == "Stemflow"


def test_ids_are_time_ordered() -> None:
    assert lifecycle.new_job_id(1) < lifecycle.new_job_id(2)


async def test_a_callback_url_must_be_http(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "callbacks")
    for bad in ("ftp://example.com/hook", "file:///etc/passwd", "not a url"):
        body = helpers.assert_problem(await helpers.submit(client, alice, callback_url=bad), 422, "validation_failed")
        assert body["errors"][0]["field"] == "callback_url"
    assert (await helpers.submit(client, alice, callback_url="https://example.com/hook")).status_code == 202
