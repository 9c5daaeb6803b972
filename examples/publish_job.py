"""Another service submits a Stemflow job straight onto the broker and follows it to the end.

    .venv/bin/python examples/publish_job.py --source-url https://example.com/song.flac --owner radio-team

It binds a queue of its own to the topic exchange for the job events (`job.progress`, `job.completed`,
`job.failed`, `job.cancelled`), publishes `job.submitted` (a CloudEvents 1.0 envelope, publisher
confirms, persistent, mandatory), prints each event of its job as it comes and, last, the terminal event
as one JSON line. Exit status: 0 completed, 1 failed or cancelled, 2 no end within --timeout.

Only the published contract is used (docs/api.md, docs/events/): aio-pika and JSON, no Stemflow code.
The job belongs to `--owner`: API keys of that owner see it over HTTP and the WebSocket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika

CONTENT_TYPE = "application/cloudevents+json"
JOB_EVENTS = ("job.progress", "job.completed", "job.failed", "job.cancelled")
TERMINAL = {"job.completed": 0, "job.failed": 1, "job.cancelled": 1}


def new_job_id() -> str:
    """Time-ordered like the gateway's own ids (ms since the epoch, then random), so listings stay newest first."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def job_submitted(job_id: str, owner: str, source_url: str, options: dict[str, Any], source: str) -> dict[str, Any]:
    """The `job.submitted` CloudEvent of docs/events/schemas/job.submitted.json."""
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": source,
        "type": "stemflow.job.submitted.v1",
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "subject": job_id,
        "datacontenttype": "application/json",
        "data": {"job_id": job_id, "owner": owner, "options": options, "input": {"source_url": source_url}},
    }


async def submit_and_follow(
    amqp_url: str, namespace: str, event: dict[str, Any], timeout_s: float
) -> dict[str, Any] | None:
    """Publish the job, then return its terminal event (None when it did not end in time)."""
    job_id = event["data"]["job_id"]
    connection = await aio_pika.connect_robust(amqp_url, client_properties={"connection_name": event["source"]})
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(f"{namespace}.events")  # declared by Stemflow's services
        # Bound before publishing, so no event of the job can be missed; gone when we disconnect.
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for routing_key in JOB_EVENTS:
            await queue.bind(exchange, routing_key)
        message = aio_pika.Message(
            json.dumps(event).encode(),
            content_type=CONTENT_TYPE,
            message_id=event["id"],
            type=event["type"],
            app_id=event["source"],
            timestamp=datetime.now(UTC),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        # Mandatory: if no queue is bound for job.submitted (Stemflow is not running), this raises.
        await exchange.publish(message, routing_key="job.submitted", mandatory=True)
        print(f"submitted job {job_id}", file=sys.stderr)
        try:
            async with asyncio.timeout(timeout_s), queue.iterator() as messages:
                async for incoming in messages:
                    async with incoming.process():
                        received = json.loads(incoming.body)
                        if received.get("data", {}).get("job_id") != job_id:
                            continue  # another job's event: this queue gets every job's
                        describe(incoming.routing_key or "", received)
                        if incoming.routing_key in TERMINAL:
                            return received
        except TimeoutError:
            return None
    return None


def describe(routing_key: str, event: dict[str, Any]) -> None:
    data = event["data"]
    if routing_key == "job.progress":
        stages = data["progress"]
        line = ", ".join(
            f"{s} {stages[s]['status']} {stages[s]['percent']:.0f}%" for s in ("ingest", "separation", "analysis")
        )
        print(f"{data['status']:>10} {stages['overall']:5.1f}%  ({line})", file=sys.stderr)
    elif routing_key == "job.failed":
        print(f"failed: {data['error']['code']}: {data['error']['message']}", file=sys.stderr)
    else:
        print(routing_key, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-url", required=True, help="http(s) URL of the song; ingest fetches it")
    parser.add_argument("--owner", default="example-service", help="who the job belongs to (an API key owner)")
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--namespace", default=os.environ.get("STEMFLOW_NAMESPACE", "stemflow"))
    parser.add_argument("--source", default="/examples/publish-job", help="the CloudEvents source of this service")
    parser.add_argument("--stems", type=int, choices=(2, 4, 6), default=4)
    parser.add_argument("--model", default="htdemucs")
    parser.add_argument("--quality", choices=("fast", "balanced", "best"), default="fast")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the job to end")
    args = parser.parse_args(argv)
    options = {"stems": args.stems, "model": args.model, "quality": args.quality}
    event = job_submitted(new_job_id(), args.owner, args.source_url, options, args.source)
    ended = asyncio.run(submit_and_follow(args.amqp_url, args.namespace, event, args.timeout))
    if ended is None:
        print(f"job {event['data']['job_id']} did not end within {args.timeout:.0f} s", file=sys.stderr)
        return 2
    print(json.dumps(ended))
    return TERMINAL[ended["type"].removeprefix("stemflow.").removesuffix(".v1")]


if __name__ == "__main__":
    sys.exit(main())
