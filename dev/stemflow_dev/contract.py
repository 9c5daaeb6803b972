"""The event contract for the teams that publish and consume our events, generated from the code.

    python -m stemflow_dev.contract write   # (re)write docs/events/ (`make contract`)
    python -m stemflow_dev.contract check   # exit 1 when docs/events/ differs from the code

Everything is derived from `stemflow_shared.events` (the CloudEvents envelope and each event's pydantic
data model) and `stemflow_shared.topology` (exchanges, queues, bindings): a JSON Schema (Draft 2020-12)
per event, the envelope with its data schema; an AsyncAPI 3.0 document whose channels are the topic
exchange's routing keys and the queues; and an index. Only prose lives here: what each event means and
who publishes it (`ABOUT`), and the envelope attributes' descriptions.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stemflow_shared.events import (
    ALL_EVENTS,
    AUDIO_INGESTED,
    CONTENT_TYPE,
    CloudEvent,
    Event,
    EventSpec,
    make_event,
)
from stemflow_shared.messaging import DEAD_LETTER_WATCH_ATTEMPTS, BrokerOptions, queue_arguments
from stemflow_shared.topology import (
    ALL_QUEUES,
    DETAIL_HEADER,
    MODEL_HEADER,
    PRIORITY_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    ROUTED_EVENTS,
    SERVICE_HEADER,
    Names,
    QueueSpec,
)

from . import contract_examples

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "events"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
AMQP_BINDING = "0.3.0"
NAMES = Names()  # the default namespace; every name takes STEMFLOW_NAMESPACE as its prefix


@dataclass(frozen=True)
class About:
    """What an event means and which services publish it (the code has no place for this prose yet)."""

    summary: str
    publishers: tuple[str, ...]


ABOUT: dict[str, About] = {
    "job.submitted": About(
        "A job was accepted: its options and where its audio is (an uploaded blob, or `source_url`). Other "
        "services may publish it themselves with `source_url`; the gateway then creates the job.",
        ("gateway", "any service"),
    ),
    "audio.ingested": About(
        "The audio was fetched, checked and normalised to 44.1 kHz stereo float WAV; the separator and "
        "the analyzer start. A job with several targets gets one per target, options narrowed to it.",
        ("ingest",),
    ),
    "ingest.failed": About(
        "The audio could not be fetched or is not usable audio; `error.code` says why.", ("ingest",)
    ),
    "separation.progress": About("The separation's percent, every few seconds while it runs.", ("separator",)),
    "separation.completed": About(
        "The stems are written to the blob store. Ingest publishes it too when it reuses a finished job's results.",
        ("separator", "ingest"),
    ),
    "separation.failed": About(
        "The separation failed (for one target of several: that target only); `error.code` says why.",
        ("separator",),
    ),
    "analysis.completed": About(
        "Tempo, beats, key, loudness of the mix. Ingest publishes it too when it reuses a finished job's results.",
        ("analyzer", "ingest"),
    ),
    "analysis.failed": About("The analysis failed; `error.code` says why.", ("analyzer",)),
    "analysis.requested": About(
        "A job that separates has its stems: the analyzer reads tempo, beats, key and chords from them and the "
        "mix (a job that separates is analysed only then, so it never completes on the mix's reading alone).",
        ("gateway",),
    ),
    "job.progress": About(
        "The job changed: its status and per-stage progress. Sent on every change, so it may repeat a status.",
        ("gateway",),
    ),
    "job.completed": About(
        "The job finished: its stems and analysis (`partial` when some of several targets failed).", ("gateway",)
    ),
    "job.failed": About("The job failed; `error.code` is the failed stage's code.", ("gateway",)),
    "job.cancelled": About("The job was cancelled through the API (or deleted while it ran).", ("gateway",)),
    "mix.requested": About(
        "A practice mix of a finished job was asked for (`POST /v1/jobs/{id}/mixes`): the stems with their gains, "
        "tempo, pitch, section, loops, click, format, and where to write the file.",
        ("gateway",),
    ),
    "mix.progress": About("The mix's render percent while it runs.", ("analyzer",)),
    "mix.completed": About("The mix is written to the blob store: its file, loudness and render time.", ("analyzer",)),
    "mix.failed": About("The mix could not be rendered; `error.code` says why.", ("analyzer",)),
    "job.mix.progress": About("A mix of the job changed (queued, running, its percent).", ("gateway",)),
    "job.mix.completed": About("A mix of the job is ready to download (`mix.path`).", ("gateway",)),
    "job.mix.failed": About("A mix of the job failed; `mix.error.code` says why.", ("gateway",)),
}

ENVELOPE_DESCRIPTIONS = {
    "specversion": "CloudEvents version: always `1.0`.",
    "id": "The event's id, also the AMQP `message_id`. A redelivered or republished event keeps its id: "
    "deduplicate on it.",
    "source": "Who published it: `/stemflow/<service>` for Stemflow's services; any non-empty URI reference "
    "for another service's `job.submitted`.",
    "type": "`stemflow.<routing key>.v1`.",
    "time": "When it was published (RFC 3339, UTC).",
    "subject": "The job id (the same as `data.job_id`).",
    "datacontenttype": "`application/json`: `data` is a JSON object.",
}

TRACE_HEADERS = {
    "traceparent": {"type": "string", "description": "W3C trace context of the publishing span (when tracing is on)."},
    "tracestate": {"type": "string", "description": "W3C trace state (when tracing is on)."},
}
ROUTING_HEADERS = {
    MODEL_HEADER: {"type": "string", "description": "`options.model`: the work exchange routes on it."},
    PRIORITY_HEADER: {"type": "string", "enum": ["normal", "high"], "description": "`options.priority`: its lane."},
}
DEAD_LETTER_HEADERS = {
    REASON_HEADER: {
        "type": "string",
        "description": "Why a service dead-lettered it: `malformed_json`, `invalid_envelope`, `invalid_data`, "
        "`unknown_type`, `unsupported_version`, `no_handler`, `handler_failed` (failed on every delivery) or a "
        "handler's own permanent error code. Absent when the broker dead-lettered it (see `x-death`).",
    },
    DETAIL_HEADER: {"type": "string", "description": "A human-readable detail (at most 1000 characters)."},
    QUEUE_HEADER: {"type": "string", "description": "The queue it left."},
    SERVICE_HEADER: {"type": "string", "description": "The service that dead-lettered it."},
    "x-death": {"type": "array", "description": "Set by RabbitMQ when the broker dead-lettered it."},
    "x-first-death-reason": {
        "type": "string",
        "description": "The broker's reason: `delivery_limit`, `rejected`, `expired`, `maxlen`.",
    },
    "x-first-death-queue": {"type": "string", "description": "The queue the broker dead-lettered it from."},
}


# --- JSON Schemas ------------------------------------------------------------------


def data_schema(spec: EventSpec[Any]) -> tuple[str, dict[str, Any]]:
    """The name of an event's data model and its JSON Schema, its `$defs` included."""
    return spec.data_model.__name__, spec.data_model.model_json_schema()


def envelope_schema(spec: EventSpec[Any]) -> dict[str, Any]:
    """The CloudEvents envelope of one event, `type` fixed and `data` its data model (Draft 2020-12)."""
    base = CloudEvent.model_json_schema()
    name, data = data_schema(spec)
    defs = {**data.pop("$defs", {}), name: data}
    properties = {
        key: {**value, "description": ENVELOPE_DESCRIPTIONS[key]} if key in ENVELOPE_DESCRIPTIONS else value
        for key, value in base["properties"].items()
    }
    properties["type"] = {"const": spec.type, "description": ENVELOPE_DESCRIPTIONS["type"]}
    properties["data"] = {"$ref": f"#/$defs/{name}"}
    about = ABOUT[spec.name]
    return {
        "$schema": DRAFT_2020_12,
        "$id": f"urn:stemflow:event:{spec.type}",
        "title": spec.type,
        "description": f"{about.summary} Routing key `{spec.routing_key}` on the topic exchange "
        f"`{NAMES.exchange}`; published by {', '.join(about.publishers)}. The body of the AMQP message "
        f"(CloudEvents structured mode, content type `{CONTENT_TYPE}`).",
        "type": "object",
        "properties": properties,
        "required": base["required"],
        "additionalProperties": True,
        "$defs": dict(sorted(defs.items())),
    }


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every event's envelope schema, by routing key."""
    return {spec.name: envelope_schema(spec) for spec in ALL_EVENTS}


# --- AsyncAPI 3.0 ---------------------------------------------------------------------


def _component_refs(node: Any) -> Any:
    """A schema with its `#/$defs/X` references pointed at `#/components/schemas/X`."""
    if isinstance(node, dict):
        return {
            key: (
                value.replace("#/$defs/", "#/components/schemas/")
                if key == "$ref" and isinstance(value, str)
                else _component_refs(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_component_refs(item) for item in node]
    return node


def _component_schemas() -> dict[str, Any]:
    """Every data model and its parts, then each event's envelope, as AsyncAPI component schemas."""
    schemas: dict[str, Any] = {}
    envelopes: dict[str, Any] = {}
    for spec in ALL_EVENTS:
        envelope = copy.deepcopy(envelope_schema(spec))
        for name, schema in envelope.pop("$defs").items():
            schema = _component_refs(schema)
            if schemas.setdefault(name, schema) != schema:
                raise ValueError(f"two different schemas are called {name}")
        for key in ("$schema", "$id"):
            envelope.pop(key)
        envelopes[spec.name] = _component_refs(envelope)
    return {**dict(sorted(schemas.items())), **envelopes}


def _headers(spec: EventSpec[Any]) -> dict[str, Any]:
    routing = spec is AUDIO_INGESTED
    schema: dict[str, Any] = {
        "type": "object",
        "description": "AMQP application headers."
        + (" The work exchange routes `audio.ingested` on the model and priority headers." if routing else ""),
        "properties": {**TRACE_HEADERS, **(ROUTING_HEADERS if routing else {})},
    }
    if routing:
        schema["required"] = sorted(ROUTING_HEADERS)
    return schema


def _message(spec: EventSpec[Any], example: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": spec.name,
        "title": spec.type,
        "summary": ABOUT[spec.name].summary,
        "description": "AMQP properties: `content_type` "
        f"`{CONTENT_TYPE}`, `message_id` = the event id, `type` = `{spec.type}`, `app_id` = the publishing "
        "service, `timestamp` = the event time, `delivery_mode` 2 (persistent).",
        "contentType": CONTENT_TYPE,
        "headers": _headers(spec),
        "payload": {"$ref": f"#/components/schemas/{spec.name}"},
        "correlationId": {"description": "The job id.", "location": "$message.payload#/subject"},
        "bindings": {"amqp": {"messageType": spec.type, "bindingVersion": AMQP_BINDING}},
        "examples": [{"name": f"{spec.name} example", "payload": example}],
    }


def _dead_letter_message() -> dict[str, Any]:
    return {
        "name": "dead-letter",
        "title": "A dead-lettered message",
        "summary": "A message a service could not handle, or the broker gave up on, with the reason in headers.",
        "description": "Its body is the original body, as it was (usually one of the events above, but possibly "
        "not JSON at all); its routing key is the original routing key.",
        "headers": {"type": "object", "properties": {**DEAD_LETTER_HEADERS, **TRACE_HEADERS}},
        "payload": {"description": "The original message body, unchanged."},
    }


def _exchange_binding(name: str, kind: str) -> dict[str, Any]:
    exchange = {"name": name, "type": kind, "durable": True, "autoDelete": False, "vhost": "/"}
    return {"amqp": {"is": "routingKey", "exchange": exchange, "bindingVersion": AMQP_BINDING}}


def _queue_binding(name: str, arguments: dict[str, Any], bound: dict[str, Any]) -> dict[str, Any]:
    queue = {"name": name, "durable": True, "exclusive": False, "autoDelete": False, "vhost": "/"}
    return {
        "amqp": {
            "is": "queue",
            "queue": queue,
            "x-arguments": arguments,
            "x-bound-to": bound,
            "bindingVersion": AMQP_BINDING,
        }
    }


def _queue_address(spec: QueueSpec) -> str:
    return NAMES.queue(spec, "{replica}") if spec.per_replica else NAMES.queue(spec)


def _queue_channel_id(spec: QueueSpec) -> str:
    return f"queue.{spec.name}"


def _consumer(spec: QueueSpec) -> str:
    return "gateway" if spec.name == "gateway" else spec.name.split(".")[0].replace("webhooks", "notifier")


def _queue_channel(spec: QueueSpec, options: BrokerOptions) -> dict[str, Any]:
    address = _queue_address(spec)
    if spec.match:
        bound: dict[str, Any] = {"exchange": NAMES.work_exchange, "x-match": "all", "headers": dict(spec.match)}
        how = "bound to the work exchange `{}` on the headers {} (x-match all)".format(
            NAMES.work_exchange, ", ".join(f"`{k}: {v}`" for k, v in spec.match)
        )
    else:
        bound = {"exchange": NAMES.exchange, "routingKeys": list(spec.routing_keys)}
        how = f"bound to `{NAMES.exchange}` with {', '.join(f'`{k}`' for k in spec.routing_keys)}"
    per_replica = " One per replica (`{replica}`: `REPLICA_ID`); it expires after an hour unused." * spec.per_replica
    channel: dict[str, Any] = {
        "address": address,
        "title": f"{_consumer(spec)}'s queue `{address}`",
        "description": f"Durable quorum queue {how}. Delivery limit `DELIVERY_LIMIT` ({options.delivery_limit} by "
        f"default); what exceeds it, or is not a valid event, is dead-lettered to `{NAMES.dead_letter_exchange}`."
        + per_replica,
        "messages": {spec_.name: {"$ref": f"#/components/messages/{spec_.name}"} for spec_ in spec.events},
        "bindings": _queue_binding(address, queue_arguments(NAMES, options, per_replica=spec.per_replica), bound),
    }
    if spec.per_replica:
        channel["parameters"] = {"replica": {"description": "The notifier replica's `REPLICA_ID` (its pod name)."}}
    return channel


def _channels(options: BrokerOptions) -> dict[str, Any]:
    channels: dict[str, Any] = {}
    for spec in ALL_EVENTS:
        channels[spec.routing_key] = {
            "address": spec.routing_key,
            "title": spec.routing_key,
            "description": f"Routing key `{spec.routing_key}` on the topic exchange `{NAMES.exchange}`. "
            + ABOUT[spec.name].summary,
            "messages": {spec.name: {"$ref": f"#/components/messages/{spec.name}"}},
            "bindings": _exchange_binding(NAMES.exchange, "topic"),
        }
    channels["separation-work"] = {
        "address": AUDIO_INGESTED.routing_key,
        "title": f"separation work on `{NAMES.work_exchange}`",
        "description": f"The headers exchange `{NAMES.work_exchange}`, bound to `{NAMES.exchange}` with "
        f"`{AUDIO_INGESTED.routing_key}`: it hands separation work only to the queue of the model and priority "
        f"its `{MODEL_HEADER}` and `{PRIORITY_HEADER}` headers name.",
        "messages": {AUDIO_INGESTED.name: {"$ref": f"#/components/messages/{AUDIO_INGESTED.name}"}},
        "bindings": _exchange_binding(NAMES.work_exchange, "headers"),
    }
    for spec in ALL_QUEUES:
        channels[_queue_channel_id(spec)] = _queue_channel(spec, options)
    dead_letter = {"dead-letter": {"$ref": "#/components/messages/dead-letter"}}
    channels["dead-letters"] = {
        "address": None,
        "title": f"dead letters on `{NAMES.dead_letter_exchange}`",
        "description": "The topic exchange every service queue dead-letters to, with the original routing key.",
        "messages": dead_letter,
        "bindings": _exchange_binding(NAMES.dead_letter_exchange, "topic"),
    }
    for address, what, arguments in (
        (NAMES.dead_letter_queue, "Every dead letter, kept for people.", {"x-queue-type": "quorum"}),
        (
            NAMES.dead_letter_watch_queue,
            "A second copy of every dead letter, which the gateway consumes to fail the job it belongs to. "
            f"No dead-letter exchange of its own: a copy not settled in {DEAD_LETTER_WATCH_ATTEMPTS} deliveries is dropped.",
            {"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_WATCH_ATTEMPTS},
        ),
    ):
        short = NAMES.short_queue(address)
        channels[f"queue.{short}"] = {
            "address": address,
            "title": f"queue `{address}`",
            "description": f"Durable quorum queue bound to `{NAMES.dead_letter_exchange}` with `#`. {what}",
            "messages": dead_letter,
            "bindings": _queue_binding(
                address, arguments, {"exchange": NAMES.dead_letter_exchange, "routingKeys": ["#"]}
            ),
        }
    return channels


def _operations() -> dict[str, Any]:
    operations: dict[str, Any] = {}
    for spec in ALL_EVENTS:
        mandatory = spec.name in ROUTED_EVENTS
        operations[f"publish.{spec.name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{spec.routing_key}"},
            "title": f"publish {spec.name}",
            "summary": f"Published by {', '.join(ABOUT[spec.name].publishers)}.",
            "description": "Persistent, with a publisher confirm; "
            + (
                "mandatory: a message no queue is bound for is an error (a shared queue always is)."
                if mandatory
                else "not mandatory: the per-replica notifier queues may be absent at a given moment."
            ),
            "messages": [{"$ref": f"#/channels/{spec.routing_key}/messages/{spec.name}"}],
            "bindings": {
                "amqp": {"deliveryMode": 2, "mandatory": mandatory, "timestamp": True, "bindingVersion": AMQP_BINDING}
            },
        }
    for spec in ALL_QUEUES:
        channel = _queue_channel_id(spec)
        operations[f"consume.{spec.name}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel}"},
            "title": f"{_consumer(spec)} consumes {spec.name}",
            "description": "Acked only after the handler's effects and outgoing events are durable; an invalid "
            "event is dead-lettered at once; a failing handler is retried up to the delivery limit, then "
            "dead-lettered. Handlers are idempotent: redelivery is normal.",
            "messages": [{"$ref": f"#/channels/{channel}/messages/{e.name}"} for e in spec.events],
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
        }
    operations["consume.dead-letter.watch"] = {
        "action": "receive",
        "channel": {"$ref": "#/channels/queue.dead-letter.watch"},
        "title": "gateway settles dead letters",
        "description": "The gateway reads the job id (`data.job_id` or `subject`), the stage (the queue it left) "
        "and the reason, and fails that stage of the job with the code `<stage>_<why>`.",
        "messages": [{"$ref": "#/channels/queue.dead-letter.watch/messages/dead-letter"}],
        "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
    }
    return operations


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the broker contract."""
    examples = example_payloads()
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Stemflow events",
            "version": "1.0.0",
            "description": "The events Stemflow's services exchange on RabbitMQ, and how other services publish "
            "`job.submitted` and follow jobs. Every message body is a CloudEvents 1.0 envelope in structured mode "
            f"(`{CONTENT_TYPE}`) whose `data` is the event's data model. Names are shown for the default "
            "namespace `stemflow`: every exchange and queue name takes `STEMFLOW_NAMESPACE` as its prefix. "
            "Consumers validate every event and dead-letter what fails; readers ignore data fields they do not "
            "know, so producers may add optional fields. Generated by `make contract` from "
            "`stemflow_shared.events` and `stemflow_shared.topology`; see docs/api.md and docs/architecture.md.",
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "local": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "RabbitMQ of a local stack (`make up`); `AMQP_URL` names the broker elsewhere.",
            }
        },
        "channels": _channels(BrokerOptions()),
        "operations": _operations(),
        "components": {
            "schemas": _component_schemas(),
            "messages": {
                **{spec.name: _message(spec, examples[spec.name]) for spec in ALL_EVENTS},
                "dead-letter": _dead_letter_message(),
            },
        },
    }


# --- examples, files ----------------------------------------------------------------

EXAMPLE_TIME = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


def example_events() -> Iterator[Event[Any]]:
    """One real event of each type, made with `make_event` (fixed time, deterministic ids)."""
    for spec, data, source in contract_examples.examples():
        event = make_event(spec, data, source=source, id=contract_examples.example_id(spec))
        event.envelope = event.envelope.model_copy(update={"time": EXAMPLE_TIME})
        yield event


def example_payloads() -> dict[str, dict[str, Any]]:
    return {event.spec.name: json.loads(event.envelope.to_json()) for event in example_events()}


def _index() -> str:
    lines = [
        "# Stemflow events: generated contract",
        "",
        "Generated from the code by `make contract` (`python -m stemflow_dev.contract write`); do not edit by",
        "hand: `dev/tests/test_contract.py` fails when these files differ from the code. The prose is in",
        "[../api.md](../api.md) (events, HTTP API, WebSocket) and [../architecture.md](../architecture.md).",
        "",
        "- `asyncapi.json`: AsyncAPI 3.0 document: channels are the topic exchange's routing keys, the work",
        "  exchange, the service queues and the dead-letter queues; messages are the CloudEvents envelope with",
        "  each data schema; AMQP 0.9.1 bindings.",
        "- `schemas/<routing key>.json`: JSON Schema (Draft 2020-12) of each event's whole message body, the",
        "  CloudEvents envelope with its `data` schema.",
        "",
        "| routing key | CloudEvents `type` | published by | consumed from |",
        "|---|---|---|---|",
    ]
    for spec in ALL_EVENTS:
        queues = ", ".join(f"`{_queue_address(q)}`" for q in ALL_QUEUES if spec in q.events)
        lines.append(
            f"| [`{spec.name}`](schemas/{spec.name}.json) | `{spec.type}` | "
            f"{', '.join(ABOUT[spec.name].publishers)} | {queues} |"
        )
    return "\n".join(lines) + "\n"


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def render() -> dict[str, str]:
    """Every generated file's text, by path relative to docs/events/."""
    missing = {spec.name for spec in ALL_EVENTS} - set(ABOUT)
    if missing:
        raise ValueError(f"contract.ABOUT has no description of {sorted(missing)}")
    files = {"README.md": _index(), "asyncapi.json": _json_text(asyncapi())}
    for name, schema in json_schemas().items():
        files[f"schemas/{name}.json"] = _json_text(schema)
    return files


def differences(root: Path = OUT) -> list[str]:
    """Paths under `root` that are missing, stale or no longer generated."""
    expected = render()
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()
    stale = [path for path, text in expected.items() if path not in present or (root / path).read_text() != text]
    return sorted(stale + sorted(present - set(expected)))


def write(root: Path = OUT) -> list[str]:
    """Write every file, remove what is no longer generated; the paths that changed."""
    changed = differences(root)
    files = render()
    for path in changed:
        target = root / path
        if path in files:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(files[path])
        else:
            target.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stemflow_dev.contract", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("write", "check"))
    parser.add_argument("--out", type=Path, default=OUT, help="the folder (default: docs/events)")
    args = parser.parse_args(argv)
    if args.command == "write":
        changed = write(args.out)
        print(f"{args.out}: " + (", ".join(changed) + " written" if changed else "up to date"))
        return 0
    stale = differences(args.out)
    if stale:
        print(f"{args.out} differs from the code ({', '.join(stale)}): run `make contract`", file=sys.stderr)
        return 1
    print(f"{args.out}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
