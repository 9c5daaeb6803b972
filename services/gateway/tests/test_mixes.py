"""Practice mixes over the API, on the real MongoDB, Redis and broker: requests, caching by parameters,
ownership, the worker's events applied (and passed on as job.mix.*), dead letters, deletion with the job."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import aio_pika
import pytest
import pytest_asyncio

from gateway.deadletters import DeadLetterWatch
from stemflow_shared.events import (
    JOB_MIX_COMPLETED,
    JOB_MIX_PROGRESS,
    MIX_COMPLETED,
    MIX_PROGRESS,
    MIX_REQUESTED,
    MixCompleted,
    MixFile,
    MixProgress,
    make_event,
    parse_event,
)
from stemflow_shared.messaging import DeadLetter


@pytest_asyncio.fixture(scope="module")
async def owner(app: Any, helpers: Any) -> dict[str, str]:
    return await helpers.new_key(app, f"mixer-{uuid.uuid4().hex[:6]}")


@pytest_asyncio.fixture(scope="module")
async def watch(app: Any, base_env: dict[str, str]) -> Any:
    """A queue of the test's own bound to the mix events, to see what the gateway publishes."""
    connection = await aio_pika.connect(base_env["AMQP_URL"])
    channel = await connection.channel()
    exchange = await channel.get_exchange(f"{base_env['STEMFLOW_NAMESPACE']}.events")
    queue = await channel.declare_queue(exclusive=True)
    for key in ("mix.requested", "job.mix.progress", "job.mix.completed", "job.mix.failed"):
        await queue.bind(exchange, key)
    yield queue
    await connection.close()


async def published(queue: Any, name: str, mix_id: str, timeout: float = 10.0) -> Any:
    """The next event `name` about the mix (others are skipped), waiting on the queue."""
    async with queue.iterator(timeout=timeout) as messages:
        async for message in messages:
            await message.ack()
            event = parse_event(message.body)
            about = getattr(event.data, "mix_id", None) or getattr(getattr(event.data, "mix", None), "id", None)
            if event.spec.name == name and about == mix_id:
                return event
    raise AssertionError(f"no {name} for {mix_id}")


async def test_a_mix_is_requested_and_its_parameters_make_its_id(app, client, owner, helpers, watch):
    job_id = await helpers.completed_job(app, client, owner, fingerprint=uuid.uuid4().hex)
    asked = await client.post(
        f"/v1/jobs/{job_id}/mixes", headers=owner, json={"preset": "instrumental", "tempo": 0.75, "semitones": -2}
    )
    assert asked.status_code == 202, asked.text
    mix = asked.json()
    assert mix["status"] == "queued" and mix["gains"] == {"vocals": 0.0, "accompaniment": 1.0}
    assert asked.headers["location"].endswith(f"/v1/jobs/{job_id}/mixes/{mix['id']}")
    work = await published(watch, "mix.requested", mix["id"])
    assert work.data.output_key == f"jobs/{job_id}/mixes/{mix['id']}/mix.wav"
    assert [(s.name, s.gain) for s in work.data.stems] == [("vocals", 0.0), ("accompaniment", 1.0)]
    assert work.data.options.tempo == 0.75 and work.data.owner.startswith("mixer-")
    queued = await published(watch, "job.mix.progress", mix["id"])
    assert queued.data.mix.status == "queued"
    # The same mix asked another way (gains instead of the preset) is the same mix: no new render.
    again = await client.post(
        f"/v1/jobs/{job_id}/mixes", headers=owner, json={"mute": ["vocals"], "tempo": 0.75, "semitones": -2}
    )
    assert again.status_code == 200 and again.json()["id"] == mix["id"]
    other = await client.post(f"/v1/jobs/{job_id}/mixes", headers=owner, json={"tempo": 0.8})
    assert other.status_code == 202 and other.json()["id"] != mix["id"]
    listed = (await client.get(f"/v1/jobs/{job_id}/mixes", headers=owner)).json()["items"]
    assert [m["id"] for m in listed] == [other.json()["id"], mix["id"]]


async def test_the_workers_events_move_the_mix_and_reach_clients(app, client, owner, helpers, watch):
    job_id = await helpers.completed_job(app, client, owner, fingerprint=uuid.uuid4().hex)
    mix = (await client.post(f"/v1/jobs/{job_id}/mixes", headers=owner, json={"format": "flac"})).json()
    mixes = app.state.mixes
    progress = MixProgress(job_id=job_id, mix_id=mix["id"], percent=40.0)
    assert await mixes.apply_event(make_event(MIX_PROGRESS, progress, source="/t"))
    assert not await mixes.apply_event(make_event(MIX_PROGRESS, progress, source="/t"))  # not forward: no-op
    running = (await client.get(f"/v1/jobs/{job_id}/mixes/{mix['id']}", headers=owner)).json()
    assert running["status"] == "running" and running["percent"] == 40.0
    assert (await client.get(f"/v1/jobs/{job_id}/mixes/{mix['id']}/file", headers=owner)).status_code == 409
    key = f"jobs/{job_id}/mixes/{mix['id']}/mix.flac"
    info = await app.state.jobs.blobs.put_stream(key, _once(b"fLaC" + b"\0" * 996))
    file = MixFile(
        blob_key=key, format="flac", media_type="audio/flac", size=info.size, duration_s=1.0, sample_rate=48000
    )
    assert await mixes.apply_event(
        make_event(MIX_COMPLETED, MixCompleted(job_id=job_id, mix_id=mix["id"], file=file), source="/t")
    )
    done = await published(watch, "job.mix.completed", mix["id"])
    assert done.spec is JOB_MIX_COMPLETED and done.data.mix.path == f"/v1/jobs/{job_id}/mixes/{mix['id']}/file"
    body = (await client.get(f"/v1/jobs/{job_id}/mixes/{mix['id']}", headers=owner)).json()
    assert body["status"] == "completed" and body["file"]["size"] == 1000 and "blob_key" not in body["file"]
    assert body["file"]["sample_rate"] == 48000  # a job's 48 kHz stems make a 48 kHz mix
    download = await client.get(f"/v1/jobs/{job_id}/mixes/{mix['id']}/file", headers=owner)
    assert download.status_code == 200 and download.content.startswith(b"fLaC")
    assert download.headers["content-type"] == "audio/flac" and download.headers["accept-ranges"] == "bytes"
    # Byte ranges, as for stems: a player seeks, a broken download resumes.
    url = f"/v1/jobs/{job_id}/mixes/{mix['id']}/file"
    part = await client.get(url, headers={**owner, "Range": "bytes=0-3"})
    assert part.status_code == 206 and part.content == b"fLaC"
    assert part.headers["content-range"] == "bytes 0-3/1000" and part.headers["content-length"] == "4"
    tail = await client.get(url, headers={**owner, "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.headers["content-range"] == "bytes 990-999/1000" and len(tail.content) == 10
    rest = await client.get(url, headers={**owner, "Range": "bytes=996-"})
    assert rest.status_code == 206 and rest.headers["content-range"] == "bytes 996-999/1000"
    for bad in ("bytes=1000-", "bytes=5-2", "bytes=0-1,4-5", "items=0-1"):
        refused = helpers.assert_problem(
            await client.get(url, headers={**owner, "Range": bad}), 416, "range_not_satisfiable"
        )
        assert refused is not None
    beyond = await client.get(url, headers={**owner, "Range": "bytes=1000-"})
    assert beyond.headers["content-range"] == "bytes */1000"
    # Terminal is terminal: a late progress event changes nothing.
    late = MixProgress(job_id=job_id, mix_id=mix["id"], percent=90.0)
    assert not await mixes.apply_event(make_event(MIX_PROGRESS, late, source="/t"))
    assert JOB_MIX_PROGRESS.name == "job.mix.progress"


async def test_a_dead_letter_of_the_mix_work_fails_the_mix_not_the_job(app, client, owner, helpers):
    job_id = await helpers.completed_job(app, client, owner, fingerprint=uuid.uuid4().hex)
    mix = (await client.post(f"/v1/jobs/{job_id}/mixes", headers=owner, json={"semitones": 3})).json()
    letter = DeadLetter(
        queue="mixer",
        reason="delivery_limit",
        detail="",
        event_type=MIX_REQUESTED.type,
        job_id=job_id,
        target=None,
        mix_id=mix["id"],
    )
    await DeadLetterWatch(app.state.jobs, app.state.mixes).settle(letter)
    failed = (await client.get(f"/v1/jobs/{job_id}/mixes/{mix['id']}", headers=owner)).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "mix_delivery_limit"
    assert (await client.get(f"/v1/jobs/{job_id}", headers=owner)).json()["status"] == "completed"
    # A failed mix asked again is rendered again.
    again = await client.post(f"/v1/jobs/{job_id}/mixes", headers=owner, json={"semitones": 3})
    assert again.status_code == 202 and again.json()["id"] == mix["id"] and again.json()["status"] == "queued"


async def test_a_stuck_mix_ends_failed_with_mix_timeout(app, client, owner, helpers, watch):
    job_id = await helpers.completed_job(app, client, owner, fingerprint=uuid.uuid4().hex)
    stuck = (await client.post(f"/v1/jobs/{job_id}/mixes", headers=owner, json={"tempo": 0.8})).json()
    fresh = (await client.post(f"/v1/jobs/{job_id}/mixes", headers=owner, json={"tempo": 0.9})).json()
    mixes, jobs = app.state.mixes, app.state.jobs.repo.jobs
    progress = MixProgress(job_id=job_id, mix_id=stuck["id"], percent=30.0)
    assert await mixes.apply_event(make_event(MIX_PROGRESS, progress, source="/t"))  # running, then silent
    doc = await jobs.find_one({"_id": job_id})
    long_ago = doc["mixes"][stuck["id"]]["updated_at"] - timedelta(hours=2)
    await jobs.update_one(
        {"_id": job_id}, {"$set": {f"mixes.{stuck['id']}.updated_at": long_ago, "mixes_pending_since": long_ago}}
    )
    assert await mixes.time_out_stuck(3600) == 1
    failed = await published(watch, "job.mix.failed", stuck["id"])
    assert failed.data.mix.error.code == "mix_timeout"
    body = (await client.get(f"/v1/jobs/{job_id}/mixes/{stuck['id']}", headers=owner)).json()
    assert (
        body["status"] == "failed" and body["error"]["code"] == "mix_timeout" and "3600 s" in body["error"]["message"]
    )
    helpers.assert_problem(
        await client.get(f"/v1/jobs/{job_id}/mixes/{stuck['id']}/file", headers=owner), 409, "mix_not_ready"
    )
    # The other mix is young: it goes on, and a second sweep finds nothing more.
    assert (await client.get(f"/v1/jobs/{job_id}/mixes/{fresh['id']}", headers=owner)).json()["status"] == "queued"
    assert await mixes.time_out_stuck(3600) == 0
    assert (await jobs.find_one({"_id": job_id}))["mixes_pending_since"] == (await jobs.find_one({"_id": job_id}))[
        "mixes"
    ][fresh["id"]]["updated_at"]
    # A late result of the failed render changes nothing; asking again renders it again.
    assert not await mixes.apply_event(make_event(MIX_PROGRESS, progress, source="/t"))
    again = await client.post(f"/v1/jobs/{job_id}/mixes", headers=owner, json={"tempo": 0.8})
    assert again.status_code == 202 and again.json()["status"] == "queued"
    # When every mix has ended, nothing is pending.
    for mix_id in (stuck["id"], fresh["id"]):
        key = f"jobs/{job_id}/mixes/{mix_id}/mix.wav"
        file = MixFile(blob_key=key, format="wav", media_type="audio/wav", size=4, duration_s=1.0, sample_rate=44100)
        await mixes.apply_event(
            make_event(MIX_COMPLETED, MixCompleted(job_id=job_id, mix_id=mix_id, file=file), source="/t")
        )
    assert (await jobs.find_one({"_id": job_id}))["mixes_pending_since"] is None


async def test_mixes_are_the_owners_alone(app, client, owner, helpers):
    job_id = await helpers.completed_job(app, client, owner, fingerprint=uuid.uuid4().hex)
    mix = (await client.post(f"/v1/jobs/{job_id}/mixes", headers=owner, json={"loops": 2, "end": 0.5})).json()
    stranger = await helpers.new_key(app, f"stranger-{uuid.uuid4().hex[:6]}")
    for method, path, body in (
        ("POST", f"/v1/jobs/{job_id}/mixes", {}),
        ("GET", f"/v1/jobs/{job_id}/mixes", None),
        ("GET", f"/v1/jobs/{job_id}/mixes/{mix['id']}", None),
        ("GET", f"/v1/jobs/{job_id}/mixes/{mix['id']}/file", None),
        ("DELETE", f"/v1/jobs/{job_id}/mixes/{mix['id']}", None),
    ):
        answer = await client.request(method, path, headers=stranger, json=body)
        helpers.assert_problem(answer, 404, "job_not_found")
    assert (await client.get(f"/v1/jobs/{job_id}/mixes/{mix['id']}", headers=owner)).status_code == 200
    helpers.assert_problem(await client.get(f"/v1/jobs/{job_id}/mixes", headers={}), 401, "unauthorized")


async def test_deleting_a_mix_and_the_job_deletes_their_files(app, client, owner, helpers):
    job_id = await helpers.completed_job(app, client, owner, fingerprint=uuid.uuid4().hex)
    blobs = app.state.jobs.blobs
    ids = []
    for tempo in (0.9, 1.1):
        mix = (await client.post(f"/v1/jobs/{job_id}/mixes", headers=owner, json={"tempo": tempo})).json()
        await blobs.put_stream(f"jobs/{job_id}/mixes/{mix['id']}/mix.wav", _once(b"RIFF"))
        ids.append(mix["id"])
    assert (await client.delete(f"/v1/jobs/{job_id}/mixes/{ids[0]}", headers=owner)).status_code == 204
    assert not await blobs.exists(f"jobs/{job_id}/mixes/{ids[0]}/mix.wav")
    helpers.assert_problem(await client.get(f"/v1/jobs/{job_id}/mixes/{ids[0]}", headers=owner), 404, "mix_not_found")
    # News of a deleted mix's render deletes the file it left.
    key = f"jobs/{job_id}/mixes/{ids[0]}/mix.wav"
    await blobs.put_stream(key, _once(b"RIFF"))
    file = MixFile(blob_key=key, format="wav", media_type="audio/wav", size=4, duration_s=1.0, sample_rate=44100)
    completed = MixCompleted(job_id=job_id, mix_id=ids[0], file=file)
    assert not await app.state.mixes.apply_event(make_event(MIX_COMPLETED, completed, source="/t"))
    assert not await blobs.exists(key)
    assert (await client.delete(f"/v1/jobs/{job_id}", headers=owner)).status_code == 204
    assert not await blobs.exists(f"jobs/{job_id}/mixes/{ids[1]}/mix.wav")
    helpers.assert_problem(await client.get(f"/v1/jobs/{job_id}/mixes", headers=owner), 404, "job_not_found")


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"tempo": 2.0}, 422, "validation_failed", "tempo"),
        ({"tempo": 0.4}, 422, "validation_failed", "tempo"),
        ({"semitones": 13}, 422, "validation_failed", "semitones"),
        ({"semitones": 12, "cents": 50}, 422, "validation_failed", "body"),
        ({"start": 5, "end": 2}, 422, "validation_failed", "body"),
        ({"format": "ogg"}, 422, "validation_failed", "format"),
        ({"format": "mp3", "bit_depth": 24}, 422, "validation_failed", "body"),
        ({"gains": {"vocals": 9}}, 422, "validation_failed", "gains.vocals"),
        ({"tempo_ratio": 0.5}, 422, "validation_failed", "tempo_ratio"),
        ({"loops": 0}, 422, "validation_failed", "loops"),
        ({"gains": {"drums": 0.5}}, 422, "unknown_stem", "gains"),
        ({"solo": ["guitar"]}, 422, "unknown_stem", "solo"),
        ({"preset": "drumless"}, 422, "preset_not_applicable", "preset"),
        ({"mute": ["vocals", "accompaniment"]}, 422, "validation_failed", "gains"),
        ({"click": True}, 422, "validation_failed", "click"),
        ({"start": 30}, 422, "section_out_of_range", "start"),
        ({"target": "htdemucs_6s-6"}, 404, "target_not_found", None),
    ],
)
async def test_bad_parameters_are_problems_with_codes(app, client, owner, helpers, body, status, code, field):
    job_id = await _shared_job(app, client, owner, helpers)
    answer = await client.post(f"/v1/jobs/{job_id}/mixes", headers=owner, json=body)
    problem = helpers.assert_problem(answer, status, code)
    if field is not None:
        assert field in [e["field"] for e in problem["errors"]], problem


async def test_a_job_not_completed_has_no_mixes_yet(app, client, owner, helpers):
    job = (await helpers.submit(client, owner)).json()
    answer = await client.post(f"/v1/jobs/{job['id']}/mixes", headers=owner, json={})
    assert helpers.assert_problem(answer, 409, "job_not_completed")["job_status"] == "queued"
    helpers.assert_problem(
        await client.post(f"/v1/jobs/{job['id']}/mixes", headers=owner, content=b"{"), 400, "malformed_json"
    )
    helpers.assert_problem(
        await client.get(f"/v1/jobs/{job['id']}/mixes/not-a-mix", headers=owner), 404, "mix_not_found"
    )


_JOB: dict[str, str] = {}


async def _shared_job(app: Any, client: Any, owner: dict[str, str], helpers: Any) -> str:
    if "id" not in _JOB:
        _JOB["id"] = await helpers.completed_job(app, client, owner, fingerprint=uuid.uuid4().hex)
    return _JOB["id"]


async def _once(data: bytes) -> Any:
    yield data


async def test_the_running_gateway_sweeps_stuck_mixes_itself(base_env, helpers):
    """STUCK_MIX_TIMEOUT_S and JOB_WATCH_INTERVAL_S wire the sweep into the gateway's lifespan: a mix no worker
    takes (no analyzer runs here) fails with mix_timeout without anyone calling the sweep."""
    settings = {"stuck_mix_timeout_s": 0.5, "job_watch_interval_s": 0.2}
    async with helpers.running_app(base_env, **settings) as app, helpers.http_client(app) as client:
        owner = await helpers.new_key(app, f"sweep-{uuid.uuid4().hex[:6]}")
        job_id = await helpers.completed_job(app, client, owner, fingerprint=uuid.uuid4().hex)
        mix = (await client.post(f"/v1/jobs/{job_id}/mixes", headers=owner, json={"tempo": 0.9})).json()
        assert mix["status"] == "queued"
        body = mix
        for _ in range(100):  # the sweep runs every 0.2 s; give a loaded machine 20 s
            body = (await client.get(f"/v1/jobs/{job_id}/mixes/{mix['id']}", headers=owner)).json()
            if body["status"] != "queued":
                break
            await asyncio.sleep(0.2)
        assert body["status"] == "failed" and body["error"]["code"] == "mix_timeout", body
