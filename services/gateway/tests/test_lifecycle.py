"""Every accepted job ends with a reason: idempotency with teeth, validation at the edge, dead letters."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.deadletters import DeadLetterWatch, failure_code, stage_of
from stemflow_shared.events import JobOptions
from stemflow_shared.messaging import DeadLetter
from stemflow_shared.metrics import REGISTRY


async def test_an_idempotency_key_reused_for_another_request_is_refused(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    headers = await helpers.new_key(app, "idem-owner")
    first = await helpers.submit(client, {**headers, "Idempotency-Key": "k-1"}, stems="2")
    assert first.status_code == 202
    again = await helpers.submit(client, {**headers, "Idempotency-Key": "k-1"}, stems="2")
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]

    other_options = await helpers.submit(client, {**headers, "Idempotency-Key": "k-1"}, stems="4")
    helpers.assert_problem(other_options, 422, "idempotency_key_reused")
    other_file = await client.post(
        "/v1/jobs",
        headers={**headers, "Idempotency-Key": "k-1"},
        files={"file": ("song.wav", helpers.wav_bytes(seconds=2.0), "audio/wav")},
        data={"stems": "2"},
    )
    helpers.assert_problem(other_file, 422, "idempotency_key_reused")
    other_body = await client.post(
        "/v1/jobs",
        headers={**headers, "Idempotency-Key": "k-1"},
        json={"source_url": "https://example.com/a.wav", "stems": 2},
    )
    helpers.assert_problem(other_body, 422, "idempotency_key_reused")
    # Nothing of the refused requests is kept: one job, one upload.
    assert len((await client.get("/v1/jobs", headers=headers)).json()["items"]) == 1
    uploads = list((app.state.jobs.blobs.root / "jobs").glob("*/upload"))
    assert [p.parent.name for p in uploads if await app.state.jobs.repo.get(p.parent.name) is None] == []


async def test_batches_honour_the_idempotency_key(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    headers = {**(await helpers.new_key(app, "idem-batch")), "Idempotency-Key": "b-1"}
    body = {"source_urls": ["https://example.com/a.wav", "https://example.com/b.wav"], "stems": 2}
    first = await client.post("/v1/batches", headers=headers, json=body)
    assert first.status_code == 202, first.text
    again = await client.post("/v1/batches", headers=headers, json=body)
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in first.json()["jobs"]]
    changed = await client.post("/v1/batches", headers=headers, json={**body, "source_urls": body["source_urls"][:1]})
    helpers.assert_problem(changed, 422, "idempotency_key_reused")
    bad_key = await client.post("/v1/batches", headers={**headers, "Idempotency-Key": "has space"}, json=body)
    helpers.assert_problem(bad_key, 400, "invalid_idempotency_key")


BAD_URLS = [
    "http://example.com:99999/a.wav",
    "http://example.com:-1/a.wav",
    "http://example.com:abc/a.wav",
    "http://a:b:c/a.wav",
    "http://[::1]:abc/a.wav",
    "https://[::1/x.wav",
    "http://[",
    "https://[zz]/x",
    "http://user:secret@example.com/a.wav",
    "http://example.com/a.wav\r\nX-Injected: 1",
    "ftp://example.com/a.wav",
    "http:///a.wav",
]


@pytest.mark.parametrize("url", BAD_URLS)
async def test_malformed_urls_are_refused_on_every_route(
    app: Any, client: httpx.AsyncClient, helpers: Any, url: str
) -> None:
    headers = await helpers.new_key(app, "urls")
    one = await client.post("/v1/jobs", headers=headers, json={"source_url": url})
    assert helpers.assert_problem(one, 422, "validation_failed")["errors"][0]["field"] == "source_url"
    many = await client.post("/v1/batches", headers=headers, json={"source_urls": ["https://example.com/ok.wav", url]})
    helpers.assert_problem(many, 422, "validation_failed")
    callback = await helpers.submit(client, headers, callback_url=url)
    body = helpers.assert_problem(callback, 422, "validation_failed")
    assert body["errors"][0]["field"] == "callback_url" and "callback_url" in body["detail"]


@pytest.mark.parametrize(
    "fields",
    [
        {"trim_end": "1e308"},
        {"trim_start": "nan"},
        {"trim_end": "inf"},
        {"trim_start": "-1"},
        {"trim_start": "5", "trim_end": "2"},
    ],
)
async def test_trims_must_be_finite_bounded_and_ordered(
    app: Any, client: httpx.AsyncClient, helpers: Any, fields: dict[str, str]
) -> None:
    headers = await helpers.new_key(app, "trims")
    helpers.assert_problem(await helpers.submit(client, headers, **fields), 422, "validation_failed")
    as_json = {k: float(v) for k, v in fields.items()}
    if all(math.isfinite(v) for v in as_json.values()):
        response = await client.post(
            "/v1/jobs", headers=headers, json={"source_url": "https://example.com/a.wav", **as_json}
        )
        helpers.assert_problem(response, 422, "validation_failed")


OPTION_VALUES = st.fixed_dictionaries(
    {},
    optional={
        "stems": st.sampled_from(["2", "4", "6", "3", "", "x", "4.0", "\u0661"]),
        "model": st.sampled_from(["htdemucs", "htdemucs_ft", "htdemucs_6s", "nope", ""]),
        "quality": st.sampled_from(["fast", "balanced", "best", "slow"]),
        "output_format": st.sampled_from(["wav", "flac", "mp3", "ogg"]),
        "trim_start": st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8)),
        "trim_end": st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8)),
        "analyze": st.sampled_from(["true", "false", "maybe"]),
        "separate": st.sampled_from(["true", "false", "0"]),
        "callback_url": st.one_of(
            st.text(max_size=40), st.from_regex(r"https?://[a-z\[\]:0-9.@-]{0,20}(:[0-9a-z-]{0,6})?/x", fullmatch=True)
        ),
        "targets": st.sampled_from(["htdemucs:4,htdemucs_6s:6", "htdemucs:4,htdemucs:4", "x:1", "htdemucs_ft:2", ""]),
        "priority": st.sampled_from(["normal", "high", "urgent"]),
        "residual": st.sampled_from(["true", "false"]),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=OPTION_VALUES)
async def test_no_option_set_makes_the_gateway_answer_5xx_and_every_accepted_one_is_executable(
    app: Any, client: httpx.AsyncClient, helpers: Any, fields: dict[str, str]
) -> None:
    headers = await helpers.new_key(app, "fuzz")
    response = await helpers.submit(client, headers, **fields)
    assert response.status_code < 500, response.text
    if response.status_code == 202:
        options = JobOptions.model_validate(response.json()["options"])
        for value in (options.trim_start, options.trim_end):
            assert value is None or (math.isfinite(value) and 0 <= value <= 24 * 3600)
        assert options.analyze or options.separate
        assert all(
            stems in (2, 4) or target.model == "htdemucs_6s" for target in options.targets for stems in [target.stems]
        )
    else:
        assert response.status_code in (422, 415), response.text


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(url=st.one_of(st.text(max_size=60), st.from_regex(r"(https?|ftp)://[^/]{0,30}(/[ -~]{0,10})?", fullmatch=True)))
async def test_no_source_url_makes_the_gateway_answer_5xx(
    app: Any, client: httpx.AsyncClient, helpers: Any, url: str
) -> None:
    headers = await helpers.new_key(app, "fuzz-url")
    for path, body in (("/v1/jobs", {"source_url": url}), ("/v1/batches", {"source_urls": [url]})):
        response = await client.post(path, headers=headers, json=body)
        assert response.status_code in (202, 422), response.text


def _letter(queue: str, reason: str, event_type: str | None = "stemflow.audio.ingested.v1", **extra: Any) -> DeadLetter:
    return DeadLetter(
        queue=queue,
        reason=reason,
        detail="d",
        event_type=event_type,
        job_id=extra.get("job_id"),
        target=extra.get("target"),
    )


@pytest.mark.parametrize(
    ("queue", "event_type", "stage"),
    [
        ("ingest", "stemflow.job.submitted.v1", "ingest"),
        ("separator.htdemucs", "stemflow.audio.ingested.v1", "separation"),
        ("separator.htdemucs_6s.high", "stemflow.audio.ingested.v1", "separation"),
        ("analyzer", "stemflow.audio.ingested.v1", "analysis"),
        ("gateway", "stemflow.analysis.completed.v1", "analysis"),
        ("gateway", "stemflow.separation.progress.v1", "separation"),
        ("gateway", "stemflow.audio.ingested.v1", "ingest"),
        ("gateway", None, "ingest"),
        ("notifier.replica-0", "stemflow.job.completed.v1", None),
    ],
)
def test_a_dead_letter_belongs_to_the_stage_whose_work_it_was(
    queue: str, event_type: str | None, stage: str | None
) -> None:
    assert stage_of(_letter(queue, "handler_failed", event_type)) == stage


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("handler_failed", "analysis_handler_error"),
        ("invalid_data", "analysis_invalid_event"),
        ("malformed_json", "analysis_invalid_event"),
        ("delivery_limit", "analysis_delivery_limit"),
        ("rejected", "analysis_dead_lettered"),
        ("job_unknown", "analysis_job_unknown"),
        ("Weird Reason!", "analysis_dead_lettered"),
        ("analysis_timeout", "analysis_timeout"),
    ],
)
def test_dead_letter_codes_are_stable(reason: str, code: str) -> None:
    assert failure_code("analysis", reason) == code
    assert failure_code("webhook", "webhook_rejected") == "webhook_rejected"


async def test_a_dead_letter_fails_its_job_once_and_one_without_a_job_is_counted(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    headers = await helpers.new_key(app, "dead-letters")
    job = (await helpers.submit(client, headers, separate="false")).json()
    watch = DeadLetterWatch(app.state.jobs)

    def settled(queue: str, outcome: str) -> float:
        return (
            REGISTRY.get_sample_value("stemflow_dead_letters_settled_total", {"queue": queue, "outcome": outcome})
            or 0.0
        )

    before = settled("analyzer", "job_failed"), settled("analyzer", "job_ended"), settled("gateway", "unattributed")
    await watch.settle(_letter("analyzer", "handler_failed", job_id=job["id"]))
    failed = (await client.get(f"/v1/jobs/{job['id']}", headers=headers)).json()
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "analysis_handler_error"
    assert "analysis" in failed["error"]["message"] and failed["error"]["message"] != "d"
    assert failed["progress"]["analysis"]["status"] == "failed"
    assert failed["progress"]["ingest"]["status"] == "skipped"
    # The same dead letter again (a redelivery) changes nothing.
    await watch.settle(_letter("analyzer", "handler_failed", job_id=job["id"]))
    assert (await client.get(f"/v1/jobs/{job['id']}", headers=headers)).json() == failed
    await watch.settle(_letter("gateway", "malformed_json", None))
    after = settled("analyzer", "job_failed"), settled("analyzer", "job_ended"), settled("gateway", "unattributed")
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


async def test_a_dead_letter_for_one_target_of_several_completes_the_job_partially(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    from stemflow_shared.events import (
        AUDIO_INGESTED,
        SEPARATION_COMPLETED,
        AudioInfo,
        AudioIngested,
        SeparationCompleted,
        SourceInfo,
        StemInfo,
        make_event,
    )

    headers = await helpers.new_key(app, "dead-target")
    job = (await helpers.submit(client, headers, targets="htdemucs:4,htdemucs_6s:6", analyze="false")).json()
    jobs = app.state.jobs
    options = JobOptions(analyze=False, targets="htdemucs:4,htdemucs_6s:6")
    audio = AudioIngested(
        job_id=job["id"],
        owner="x",
        options=options,
        audio=AudioInfo(blob_key="a", duration_s=1, sample_rate=44100, channels=2, frames=44100, fingerprint="dl"),
        source=SourceInfo(format="WAV", sample_rate=44100, channels=2, duration_s=1),
    )
    await jobs.apply_event(make_event(AUDIO_INGESTED, audio, source="/t"))
    stem = StemInfo(name="vocals", format="wav", media_type="audio/wav", blob_key="k", size=1, duration_s=1)
    done = SeparationCompleted(
        job_id=job["id"], target="htdemucs-4", model="htdemucs", device="cpu", precision="float32", stems=[stem]
    )
    await jobs.apply_event(make_event(SEPARATION_COMPLETED, done, source="/t"))
    await DeadLetterWatch(jobs).settle(
        _letter("separator.htdemucs_6s", "delivery_limit", job_id=job["id"], target="htdemucs_6s-6")
    )
    after = (await client.get(f"/v1/jobs/{job['id']}", headers=headers)).json()
    assert after["status"] == "completed" and after["partial"] is True
    assert after["progress"]["targets"]["htdemucs_6s-6"]["status"] == "failed"
