"""`POST /v1/jobs` with the audio as the body: options in the query string, the same rules as multipart."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stemflow_dev.fixtures import SERVING_REPLICA
from stemflow_shared.separators import CATALOGUE, SeparatorRegistry

WAV = {"Content-Type": "audio/wav"}


async def post_raw(
    client: httpx.AsyncClient, headers: dict[str, str], body: Any, query: str = "", **extra: str
) -> httpx.Response:
    return await client.post(f"/v1/jobs{query}", headers={**headers, **WAV, **extra}, content=body)


def uploads(app: Any) -> list[Path]:
    """Every upload blob in the store (the filesystem backend of the tests)."""
    return sorted(Path(app.state.settings.blob_dir).glob("jobs/*/upload"))


async def test_a_raw_body_becomes_the_owners_job(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice, bob = await helpers.new_key(app, "raw-alice"), await helpers.new_key(app, "raw-bob")
    audio = helpers.wav_bytes()
    disposition = "attachment; filename=\"caf_ song.wav\"; filename*=UTF-8''caf%C3%A9%20song.wav"
    response = await post_raw(
        client, alice, audio, "?stems=2&quality=fast&analyze=false", **{"Content-Disposition": disposition}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    assert job["input"] == {
        "filename": "café song.wav",
        "content_type": "audio/wav",
        "size": len(audio),
        "sha256": hashlib.sha256(audio).hexdigest(),
    }
    assert job["options"]["stems"] == 2 and job["options"]["quality"] == "fast" and job["options"]["analyze"] is False
    stored = await app.state.jobs.document(job["id"], "raw-alice")
    assert Path(app.state.settings.blob_dir, stored["input"]["blob_key"]).read_bytes() == audio

    assert (await client.get(f"/v1/jobs/{job['id']}", headers=alice)).json()["id"] == job["id"]
    helpers.assert_problem(await client.get(f"/v1/jobs/{job['id']}", headers=bob), 404, "job_not_found")
    assert [i["id"] for i in (await client.get("/v1/jobs", headers=alice)).json()["items"]] == [job["id"]]
    assert (await client.get("/v1/jobs", headers=bob)).json()["items"] == []
    helpers.assert_problem(await post_raw(client, {}, audio), 401, "unauthorized")


async def test_octet_stream_and_a_plain_file_name(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "raw-octets")
    headers = {
        **alice,
        "Content-Type": "application/octet-stream",
        "Content-Disposition": 'inline; filename="../a.flac"',
    }
    job = (await client.post("/v1/jobs?targets=htdemucs:4,htdemucs_6s:6", headers=headers, content=b"x" * 100)).json()
    assert job["input"]["filename"] == "a.flac" and job["input"]["content_type"] == "application/octet-stream"
    assert [(t["model"], t["stems"]) for t in job["options"]["targets"]] == [("htdemucs", 4), ("htdemucs_6s", 6)]
    anonymous = await post_raw(client, alice, b"y" * 10)
    assert anonymous.status_code == 202 and "filename" not in anonymous.json()["input"]


async def test_bad_raw_bodies_are_refused_and_nothing_is_kept(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "raw-bad")
    before = uploads(app)
    empty = helpers.assert_problem(await post_raw(client, alice, b""), 422, "validation_failed")
    assert empty["errors"][0]["field"] == "file"
    for media_type in ("audio/x-unheard-of", "video/mp4", "text/plain"):
        response = await client.post("/v1/jobs", headers={**alice, "Content-Type": media_type}, content=b"abc")
        helpers.assert_problem(response, 415, "unsupported_media_type")
    no_type = await client.post("/v1/jobs", headers=alice, content=b"abc")
    helpers.assert_problem(no_type, 415, "unsupported_media_type")
    # A raw body is one song: batches take multipart or JSON only.
    helpers.assert_problem(
        await client.post("/v1/batches", headers={**alice, **WAV}, content=b"abc"), 415, "unsupported_media_type"
    )
    bad_options = helpers.assert_problem(
        await post_raw(client, alice, b"abc", "?stems=3&quality=loud"), 422, "validation_failed"
    )
    assert {e["field"] for e in bad_options["errors"]} == {"stems", "quality"}
    helpers.assert_problem(await post_raw(client, alice, b"abc", "?trim_start=nan"), 422, "validation_failed")
    assert uploads(app) == before
    assert (await client.get("/v1/jobs", headers=alice)).json()["items"] == []


async def test_raw_bodies_over_the_limit_are_413(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "raw-big")
    limit = app.state.settings.max_upload_bytes
    before = uploads(app)
    declared = await post_raw(client, alice, b"x" * (limit + 1))
    helpers.assert_problem(declared, 413, "payload_too_large")

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit is found while streaming
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    helpers.assert_problem(await post_raw(client, alice, chunked()), 413, "payload_too_large")
    assert (await post_raw(client, alice, b"x" * limit)).status_code == 202
    assert len(uploads(app)) == len(before) + 1


async def test_idempotency_covers_the_body_kind(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "raw-idem")
    audio = helpers.wav_bytes()
    key = {"Idempotency-Key": "raw-song-1", "Content-Disposition": 'attachment; filename="song.wav"'}
    first = await post_raw(client, alice, audio, "?stems=2", **key)
    again = await post_raw(client, alice, audio, "?stems=2", **key)
    assert first.status_code == again.status_code == 202 and again.json()["id"] == first.json()["id"]
    before = uploads(app)
    other_body = await post_raw(client, alice, audio + b"\0", "?stems=2", **key)
    helpers.assert_problem(other_body, 422, "idempotency_key_reused")
    other_options = await post_raw(client, alice, audio, "?stems=4", **key)
    helpers.assert_problem(other_options, 422, "idempotency_key_reused")
    # The same song, name and options as a form is another kind of request.
    as_form = await client.post(
        "/v1/jobs",
        headers={**alice, "Idempotency-Key": "raw-song-1"},
        files={"file": ("song.wav", audio, "audio/wav")},
        data={"stems": "2"},
    )
    helpers.assert_problem(as_form, 422, "idempotency_key_reused")
    assert uploads(app) == before
    assert [i["id"] for i in (await client.get("/v1/jobs", headers=alice)).json()["items"]] == [first.json()["id"]]


async def test_a_raw_upload_for_a_model_nobody_serves_is_refused(
    base_env: dict[str, str], redis_client: Any, helpers: Any
) -> None:
    namespace = base_env["STEMFLOW_NAMESPACE"]
    await SeparatorRegistry(redis_client, f"{namespace}:").withdraw(SERVING_REPLICA)
    await helpers.announce_models(redis_client, namespace, ["htdemucs"])
    try:
        async with helpers.running_app(base_env) as app, helpers.http_client(app) as client:
            alice = await helpers.new_key(app, "raw-unserved")
            before = uploads(app)
            refused = await post_raw(client, alice, helpers.wav_bytes(), "?model=htdemucs_6s&stems=6")
            assert helpers.assert_problem(refused, 422, "model_unavailable")["errors"][0]["field"] == "model"
            assert uploads(app) == before
            assert (await post_raw(client, alice, helpers.wav_bytes(), "?model=htdemucs")).status_code == 202
    finally:
        await helpers.announce_models(redis_client, namespace, list(CATALOGUE))


async def test_the_openapi_document_offers_the_raw_body(client: httpx.AsyncClient) -> None:
    operation = (await client.get("/openapi.json")).json()["paths"]["/v1/jobs"]["post"]
    assert {"audio/*", "application/octet-stream", "multipart/form-data", "application/json"} <= set(
        operation["requestBody"]["content"]
    )
    assert {"stems", "model", "targets"} <= {p["name"] for p in operation["parameters"] if p["in"] == "query"}


async def test_the_cli_uploads_the_song_as_the_body(
    app: Any, client: httpx.AsyncClient, helpers: Any, tmp_path: Path
) -> None:
    cli = pytest.importorskip("stemflow_cli.api")
    alice = await helpers.new_key(app, "raw-cli")
    song = tmp_path / "ça va.wav"
    song.write_bytes(helpers.wav_bytes())
    sent: list[int] = []
    async with cli.Api("http://gateway", alice["Authorization"].removeprefix("Bearer ")) as api:
        await api._http.aclose()  # the same client, on the in-process gateway
        api._http = httpx.AsyncClient(transport=client._transport, base_url="http://gateway", headers=api._http.headers)
        job = await api.submit_file(song, {"stems": 2, "analyze": False, "targets": ["htdemucs:2"]}, sent.append)
    assert job["input"]["filename"] == "ça va.wav" and job["input"]["content_type"] == "audio/wav"
    assert job["input"]["size"] == sum(sent) == song.stat().st_size
    assert job["options"]["analyze"] is False and job["options"]["targets"][0]["stems"] == 2


@pytest.mark.parametrize("kind", ["raw", "multipart"])
async def test_a_client_that_leaves_mid_upload_leaves_nothing_behind(app: Any, helpers: Any, kind: str) -> None:
    """The body is read straight from ASGI `receive`: a disconnect in the middle is the client's (499), and
    neither the upload, its temporary file nor a job remains."""
    owner = f"raw-left-{kind}"
    alice = await helpers.new_key(app, owner)
    blob_dir = Path(app.state.settings.blob_dir)
    before, temps_before = uploads(app), set(blob_dir.glob(".tmp/*"))
    content_type, first = b"audio/wav", b"x" * 65536
    if kind == "multipart":
        content_type = b"multipart/form-data; boundary=cut"
        first = b'--cut\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + first
    incoming = [
        {"type": "http.request", "body": first, "more_body": True},
        {"type": "http.request", "body": b"y" * 65536, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = helpers.upload_scope([(b"authorization", alice["Authorization"].encode()), (b"content-type", content_type)])
    await app(scope, receive, send)
    assert incoming == [] and sent[0]["status"] == 499
    assert uploads(app) == before and set(blob_dir.glob(".tmp/*")) == temps_before
    assert await app.state.jobs.repo.jobs.count_documents({"owner": owner}) == 0
