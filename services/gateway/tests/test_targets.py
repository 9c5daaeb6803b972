"""Jobs with several separation targets, through the API: per-target status, results and downloads."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import httpx

from stemflow_shared.events import (
    AUDIO_INGESTED,
    SEPARATION_COMPLETED,
    SEPARATION_FAILED,
    AudioInfo,
    AudioIngested,
    ErrorInfo,
    JobOptions,
    SeparationCompleted,
    SourceInfo,
    StageFailed,
    StemInfo,
    make_event,
)
from stemflow_shared.storage import stem_key


async def _once(data: bytes) -> Any:
    yield data


async def _ingested(app: Any, job_id: str) -> None:
    audio = AudioIngested(
        job_id=job_id,
        owner="o",
        options=JobOptions(analyze=False),
        audio=AudioInfo(blob_key="a", duration_s=1, sample_rate=44100, channels=2, frames=44100, fingerprint=job_id),
        source=SourceInfo(format="WAV", sample_rate=44100, channels=2, duration_s=1),
    )
    await app.state.jobs.apply_event(make_event(AUDIO_INGESTED, audio, source="/t"))


async def _separated(app: Any, job_id: str, target: str, model: str, names: list[str]) -> None:
    jobs = app.state.jobs
    stems = []
    for name in names:
        key = stem_key(job_id, name, "wav", target)
        info = await jobs.blobs.put_stream(key, _once(f"{target}/{name}".encode() * 100))
        stems.append(
            StemInfo(name=name, format="wav", media_type="audio/wav", blob_key=key, size=info.size, duration_s=1)
        )
    done = SeparationCompleted(
        job_id=job_id, target=target, model=model, device="cpu", precision="float32", stems=stems
    )
    await jobs.apply_event(make_event(SEPARATION_COMPLETED, done, source="/t"))


async def test_each_target_has_its_status_results_and_downloads(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "targets")
    answer = await helpers.submit(client, alice, targets="htdemucs:2,htdemucs_6s:6", analyze="false")
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["options"]["model"] == "htdemucs" and job["options"]["stems"] == 2  # the primary target
    assert job["progress"]["targets"] == {
        "htdemucs-2": {"status": "pending", "percent": 0.0},
        "htdemucs_6s-6": {"status": "pending", "percent": 0.0},
    }
    await _ingested(app, job["id"])
    await _separated(app, job["id"], "htdemucs_6s-6", "htdemucs_6s", ["guitar", "piano"])
    running = (await client.get(f"/v1/jobs/{job['id']}", headers=alice)).json()
    assert running["status"] == "processing"
    assert running["result"]["targets"]["htdemucs_6s-6"]["status"] == "completed"
    assert running["result"]["targets"]["htdemucs-2"]["status"] == "running"
    await _separated(app, job["id"], "htdemucs-2", "htdemucs", ["vocals", "accompaniment"])

    done = (await client.get(f"/v1/jobs/{job['id']}", headers=alice)).json()
    assert done["status"] == "completed" and done["partial"] is False
    six = done["result"]["targets"]["htdemucs_6s-6"]
    assert [s["name"] for s in six["stems"]] == ["guitar", "piano"] and six["separation"]["model"] == "htdemucs_6s"
    assert six["stems"][0]["url"].endswith("/stems/guitar?target=htdemucs_6s-6")
    guitar = await client.get(six["stems"][0]["url"].split("gateway", 1)[-1], headers=alice)
    assert guitar.status_code == 200 and guitar.content == b"htdemucs_6s-6/guitar" * 100
    # Without `target`: the primary target's stems, as for any job.
    assert [s["name"] for s in done["result"]["stems"]] == ["vocals", "accompaniment"]
    vocals = await client.get(f"/v1/jobs/{job['id']}/stems/vocals", headers=alice)
    assert vocals.content == b"htdemucs-2/vocals" * 100
    archive = await client.get(f"/v1/jobs/{job['id']}/stems.zip?target=htdemucs_6s-6", headers=alice)
    assert sorted(zipfile.ZipFile(io.BytesIO(archive.content)).namelist()) == ["guitar.wav", "piano.wav"]
    helpers.assert_problem(
        await client.get(f"/v1/jobs/{job['id']}/stems/vocals?target=nope", headers=alice), 404, "target_not_found"
    )
    helpers.assert_problem(
        await client.get(f"/v1/jobs/{job['id']}/stems/vocals?target=htdemucs_6s-6", headers=alice),
        404,
        "stem_not_found",
    )


async def test_a_failed_target_leaves_a_partial_completed_job(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "targets-partial")
    job = (await helpers.submit(client, alice, targets="htdemucs:4,htdemucs_6s:6", analyze="false")).json()
    await _ingested(app, job["id"])
    failed = StageFailed(job_id=job["id"], target="htdemucs_6s-6", error=ErrorInfo(code="model_unavailable"))
    await app.state.jobs.apply_event(make_event(SEPARATION_FAILED, failed, source="/t"))
    await _separated(app, job["id"], "htdemucs-4", "htdemucs", ["vocals", "drums", "bass", "other"])
    done = (await client.get(f"/v1/jobs/{job['id']}", headers=alice)).json()
    assert done["status"] == "completed" and done["partial"] is True and done["error"] is None
    assert done["result"]["targets"]["htdemucs_6s-6"]["error"]["code"] == "model_unavailable"
    assert done["result"]["targets"]["htdemucs_6s-6"]["stems_zip"] is None


async def test_bad_targets_are_422(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "targets-bad")
    for bad in ("htdemucs:6", "nope:4", "htdemucs:4,htdemucs:4", ",".join(["htdemucs:2"] * 5)):
        helpers.assert_problem(await helpers.submit(client, alice, targets=bad), 422, "validation_failed")
