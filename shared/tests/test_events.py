import json

import pytest

from stemflow_shared.events import (
    AUDIO_INGESTED,
    JOB_SUBMITTED,
    SPECS_BY_TYPE,
    EventError,
    InputRef,
    JobOptions,
    JobSubmitted,
    event_id,
    json_schemas,
    make_event,
    parse_event,
)


def submitted(**options: object) -> JobSubmitted:
    return JobSubmitted(
        job_id="job1", owner="alice", options=JobOptions(**options), input=InputRef(blob_key="jobs/job1/upload")
    )


def test_round_trip_keeps_type_subject_and_data() -> None:
    event = make_event(JOB_SUBMITTED, submitted(stems=2), source="/stemflow/gateway")
    body = event.envelope.to_json()
    parsed = parse_event(body)
    assert parsed.spec is JOB_SUBMITTED
    assert parsed.envelope.type == "stemflow.job.submitted.v1"
    assert parsed.envelope.subject == "job1"
    assert parsed.envelope.specversion == "1.0"
    assert parsed.data == event.data
    assert json.loads(body)["data"]["options"]["stems"] == 2


def test_every_event_name_maps_to_a_versioned_type() -> None:
    assert set(SPECS_BY_TYPE) == {f"stemflow.{s.name}.v1" for s in SPECS_BY_TYPE.values()}
    assert AUDIO_INGESTED.routing_key == "audio.ingested"
    assert len(SPECS_BY_TYPE) == 20


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "malformed_json"),
        (b"[1, 2]", "invalid_envelope"),
        (b'{"specversion": "0.3", "id": "x", "source": "s", "type": "t", "data": {}}', "invalid_envelope"),
        (b'{"specversion": "1.0", "id": "x", "source": "s", "type": "com.other.thing", "data": {}}', "unknown_type"),
        (
            b'{"specversion": "1.0", "id": "x", "source": "s", "type": "stemflow.job.submitted.v2", "data": {}}',
            "unsupported_version",
        ),
        (
            b'{"specversion": "1.0", "id": "x", "source": "s", "type": "stemflow.job.submitted.v1", "data": {"job_id": "j"}}',
            "invalid_data",
        ),
    ],
)
def test_bad_events_are_refused_with_a_reason(body: bytes, code: str) -> None:
    with pytest.raises(EventError) as info:
        parse_event(body)
    assert info.value.code == code
    assert info.value.detail


def test_unknown_payload_fields_are_tolerated_for_forward_compatibility() -> None:
    event = make_event(JOB_SUBMITTED, submitted(), source="/x")
    raw = json.loads(event.envelope.to_json())
    raw["data"]["a_field_from_the_future"] = 1
    raw["an_extension"] = "kept"
    parsed = parse_event(json.dumps(raw))
    assert parsed.data.job_id == "job1"
    assert parsed.envelope.model_extra == {"an_extension": "kept"}


@pytest.mark.parametrize(
    "options",
    [
        {"trim_start": 10, "trim_end": 5},
        {"trim_start": -1},
        {"stems": 6, "model": "htdemucs"},
        {"stems": 3},
        {"model": "nope"},
        {"output_format": "ogg"},
        {"analyze": False, "separate": False},
    ],
)
def test_invalid_options_are_rejected(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        JobOptions(**options)


def test_input_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError):
        InputRef()
    with pytest.raises(ValueError):
        InputRef(blob_key="a", source_url="http://x")


def test_job_ids_cannot_smuggle_paths() -> None:
    with pytest.raises(ValueError):
        JobSubmitted(job_id="../etc", owner="o", input=InputRef(blob_key="k"))


def test_deterministic_ids_are_stable_and_distinct() -> None:
    assert event_id("j", "separation.completed") == event_id("j", "separation.completed")
    assert event_id("j", "separation.completed") != event_id("j", "analysis.completed")


def test_make_event_checks_the_payload_type() -> None:
    with pytest.raises(TypeError):
        make_event(AUDIO_INGESTED, submitted(), source="/x")  # type: ignore[arg-type]


def test_json_schemas_cover_every_event() -> None:
    schemas = json_schemas()
    assert set(schemas) == set(SPECS_BY_TYPE)
    assert "job_id" in schemas["stemflow.job.submitted.v1"]["properties"]
