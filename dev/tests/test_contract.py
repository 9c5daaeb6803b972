"""The generated event contract (docs/events/) is the code's, and real validators accept it.

JSON Schemas: checked against the Draft 2020-12 metaschema, then real events made with `make_event`
validated against them. AsyncAPI: validated against the official AsyncAPI 3.0.0 JSON Schema, shipped
in the npm package @asyncapi/specs and kept in dev/tests/asyncapi/ (nothing is downloaded).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator, Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from stemflow_dev import contract, contract_examples
from stemflow_shared.events import (
    ALL_EVENTS,
    AUDIO_INGESTED,
    JOB_COMPLETED,
    JOB_SUBMITTED,
    SPECS_BY_TYPE,
    EventError,
    JobOptions,
    Target,
    make_event,
    parse_event,
)
from stemflow_shared.topology import ALL_QUEUES, Names

ASYNCAPI_3_SCHEMA = Path(__file__).parent / "asyncapi" / "3.0.0.json"
EVENT_NAMES = [spec.name for spec in ALL_EVENTS]


def committed(path: str) -> Any:
    return json.loads((contract.OUT / path).read_text())


def event_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(committed(f"schemas/{name}.json"), format_checker=FormatChecker())


def asyncapi_validator() -> Draft7Validator:
    return Draft7Validator(json.loads(ASYNCAPI_3_SCHEMA.read_text()))


def real_events() -> Iterator[Any]:
    """The contract's examples, and variations of them that the services also publish."""
    yield from contract.example_events()
    targets = JobOptions(targets=[Target(model="htdemucs", stems=4), Target(model="htdemucs_6s", stems=6)])
    submitted = {spec.name: data for spec, data, _ in contract_examples.examples()}
    by_upload = submitted[JOB_SUBMITTED.name].model_copy(
        update={
            "options": targets,
            "input": submitted[JOB_SUBMITTED.name].input.model_copy(
                update={"source_url": None, "blob_key": "jobs/x/upload", "filename": "song.wav", "size": 10}
            ),
        }
    )
    yield make_event(JOB_SUBMITTED, by_upload, source="/stemflow/gateway")
    one_target = targets.for_target(targets.targets[1])
    ingested = submitted[AUDIO_INGESTED.name].model_copy(
        update={"options": one_target, "target": "htdemucs_6s-6", "primary": False, "reused": True}
    )
    yield make_event(AUDIO_INGESTED, ingested, source="/stemflow/ingest")
    partial = submitted[JOB_COMPLETED.name].model_copy(update={"partial": True, "batch_id": "b1", "analysis": None})
    yield make_event(JOB_COMPLETED, partial, source="/stemflow/gateway")


def test_committed_contract_is_generated_from_the_code() -> None:
    assert contract.differences() == [], "docs/events/ differs from the code: run `make contract`"


def test_drift_is_noticed(tmp_path: Path) -> None:
    assert contract.write(tmp_path)
    assert contract.differences(tmp_path) == []
    (tmp_path / "schemas" / "job.submitted.json").write_text("{}\n")
    (tmp_path / "schemas" / "job.renamed.json").write_text("{}\n")
    assert contract.differences(tmp_path) == ["schemas/job.renamed.json", "schemas/job.submitted.json"]
    assert contract.main(["check", "--out", str(tmp_path)]) == 1
    contract.write(tmp_path)
    assert contract.main(["check", "--out", str(tmp_path)]) == 0


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_event_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = committed(f"schemas/{name}.json")
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["type"]["const"] == f"stemflow.{name}.v1"


def test_real_events_validate_against_their_schemas() -> None:
    seen = set()
    for event in real_events():
        body = json.loads(event.envelope.to_json())
        event_validator(event.spec.name).validate(body)
        assert parse_event(event.envelope.to_json()).spec is event.spec
        seen.add(event.spec.name)
    assert seen == set(EVENT_NAMES)


def _broken(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    node = body
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return body


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("specversion",), "0.3"),
        (("id",), ""),
        (("data",), KeyError),
        (("data", "job_id"), "../etc"),
        (("data", "owner"), ""),
        (("data", "options", "stems"), 5),
        (("data", "options", "model"), "spleeter"),
        (("data", "options", "targets"), [{"model": "htdemucs", "stems": 4}] * 5),
        (("data", "input", "source_url"), "x" * 2049),
        (("time",), "yesterday"),
    ],
)
def test_schema_refuses_what_consumers_refuse(path: tuple[str, ...], value: Any) -> None:
    body = _broken(contract.example_payloads()[JOB_SUBMITTED.name], path, value)
    with pytest.raises(ValidationError):
        event_validator(JOB_SUBMITTED.name).validate(body)
    with pytest.raises(EventError):
        parse_event(json.dumps(body))


def test_schema_pins_the_event_type() -> None:
    body = contract.example_payloads()[JOB_SUBMITTED.name]
    with pytest.raises(ValidationError):
        event_validator(AUDIO_INGESTED.name).validate(body)


def test_asyncapi_document_is_valid_asyncapi_3() -> None:
    document = committed("asyncapi.json")
    assert document["asyncapi"] == "3.0.0"
    asyncapi_validator().validate(document)


def test_the_asyncapi_validator_refuses_a_broken_document() -> None:
    document = committed("asyncapi.json")
    validator = asyncapi_validator()
    for path, value in [
        (("operations", "publish.job.submitted", "action"), "publish"),
        (("channels", "job.submitted", "bindings", "amqp", "exchange", "type"), "bogus"),
        (("channels", "queue.ingest", "bindings", "amqp", "queue"), KeyError),
        (("components", "messages", "job.submitted", "bindings", "amqp", "bindingVersion"), "9.9.9"),
        (("components", "schemas", "JobOptions", "type"), 5),
    ]:
        assert list(validator.iter_errors(_broken(document, path, value))), path


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_every_asyncapi_reference_resolves() -> None:
    document = committed("asyncapi.json")
    for ref in set(_refs(document)):
        assert ref.startswith("#/"), ref
        node = document
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]


def test_asyncapi_message_examples_match_their_payload_schemas() -> None:
    document = committed("asyncapi.json")
    registry = Registry().with_resource("urn:asyncapi", Resource.from_contents(document, DRAFT7))
    for name, message in document["components"]["messages"].items():
        for example in message.get("examples", []):
            schema = {"$ref": "urn:asyncapi" + message["payload"]["$ref"]}
            Draft7Validator(schema, registry=registry, format_checker=FormatChecker()).validate(example["payload"])
            assert SPECS_BY_TYPE[example["payload"]["type"]].name == name


def test_asyncapi_channels_are_the_topology() -> None:
    document = committed("asyncapi.json")
    names = Names()
    channels = document["channels"]
    addresses = {channel["address"] for channel in channels.values()}
    assert {spec.routing_key for spec in ALL_EVENTS} <= addresses
    for queue in ALL_QUEUES:
        channel = channels[f"queue.{queue.name}"]
        assert channel["address"] == names.queue(queue, "{replica}")
        assert set(channel["messages"]) == {spec.name for spec in queue.events}
    assert {names.dead_letter_queue, names.dead_letter_watch_queue} <= addresses
    sent = {op["channel"]["$ref"] for op in document["operations"].values() if op["action"] == "send"}
    assert sent == {f"#/channels/{spec.routing_key}" for spec in ALL_EVENTS}
