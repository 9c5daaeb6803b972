"""The messaging rules against a real RabbitMQ: confirms, dead-lettering with reasons, retries, tracing."""

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from stemflow_shared.events import (
    AUDIO_INGESTED,
    INGEST_FAILED,
    JOB_SUBMITTED,
    ErrorInfo,
    Event,
    InputRef,
    JobSubmitted,
    StageFailed,
    make_event,
)
from stemflow_shared.messaging import Broker, BrokerOptions, PermanentError
from stemflow_shared.metrics import REGISTRY
from stemflow_shared.topology import DETAIL_HEADER, INGEST_QUEUE, REASON_HEADER, Names

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracing() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


@contextlib.asynccontextmanager
async def open_broker(stack: Any, delivery_limit: int = 3) -> AsyncIterator[Broker]:
    """A broker on a namespace of its own, removed afterwards."""
    from stemflow_dev.fixtures import delete_namespace

    ns = f"m{uuid.uuid4().hex[:8]}"
    options = BrokerOptions(delivery_limit=delivery_limit, retry_backoff_s=0.01)
    broker = await Broker(stack.amqp_url, Names(ns), "test", options).connect()
    try:
        yield broker
    finally:
        await broker.stop_consuming(1)
        await broker.close()
        await delete_namespace(stack.amqp_url, ns)


@pytest_asyncio.fixture
async def broker(stack: Any) -> AsyncIterator[Broker]:
    async with open_broker(stack) as broker:
        yield broker


def submitted(job_id: str = "j1") -> Event[JobSubmitted]:
    data = JobSubmitted(job_id=job_id, owner="o", input=InputRef(blob_key=f"jobs/{job_id}/upload"))
    return make_event(JOB_SUBMITTED, data, source="/stemflow/test")


async def next_dead_letter(broker: Broker, timeout: float = 10.0) -> aio_pika.abc.AbstractIncomingMessage:
    connection = await aio_pika.connect(broker.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(broker.names.dead_letter_queue, ensure=False)
        async with queue.iterator() as messages:
            message = await asyncio.wait_for(anext(messages), timeout)
            await message.ack()
            return message


async def ready_in(broker: Broker, queue: str) -> int:
    """Messages ready in `queue`, read on a connection of the test's own."""
    async with await aio_pika.connect(broker.url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def publish_raw(broker: Broker, body: bytes, routing_key: str = "job.submitted") -> None:
    connection = await aio_pika.connect(broker.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(broker.names.exchange)
        await exchange.publish(aio_pika.Message(body, message_id="raw-1"), routing_key)


async def test_a_handler_gets_typed_events_and_its_outputs_are_published(broker: Broker) -> None:
    seen: list[Event[Any]] = []
    failures: asyncio.Queue[Event[Any]] = asyncio.Queue()

    async def ingest(event: Event[JobSubmitted]) -> list[Event[Any]]:
        seen.append(event)
        failed = StageFailed(job_id=event.data.job_id, error=ErrorInfo(code="not_audio"))
        return [make_event(INGEST_FAILED, failed, source="/stemflow/test")]

    from stemflow_shared.topology import QueueSpec

    async def collect(event: Event[Any]) -> None:
        await failures.put(event)

    await broker.consume(QueueSpec("sink", (INGEST_FAILED,)), {INGEST_FAILED: collect})
    await broker.consume(INGEST_QUEUE, {JOB_SUBMITTED: ingest})
    await broker.publish(submitted("j7"))
    out = await asyncio.wait_for(failures.get(), 10)
    assert seen[0].data.job_id == "j7"
    assert out.data.error.code == "not_audio"
    assert out.envelope.source == "/stemflow/test"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\x00\x01 not json", "malformed_json"),
        (
            json.dumps(
                {"specversion": "1.0", "id": "a", "source": "s", "type": "stemflow.job.submitted.v9", "data": {}}
            ).encode(),
            "unsupported_version",
        ),
        (
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": "a",
                    "source": "s",
                    "type": "stemflow.job.submitted.v1",
                    "data": {"job_id": "x"},
                }
            ).encode(),
            "invalid_data",
        ),
    ],
)
async def test_invalid_events_are_dead_lettered_with_the_reason_and_the_queue_keeps_flowing(
    broker: Broker, body: bytes, reason: str
) -> None:
    handled: asyncio.Queue[str] = asyncio.Queue()

    async def ingest(event: Event[JobSubmitted]) -> None:
        await handled.put(event.data.job_id)

    await broker.consume(INGEST_QUEUE, {JOB_SUBMITTED: ingest})
    await publish_raw(broker, body)
    dead = await next_dead_letter(broker)
    assert dead.headers[REASON_HEADER] == reason
    assert dead.headers[DETAIL_HEADER]
    assert dead.body == body
    await broker.publish(submitted("after"))
    assert await asyncio.wait_for(handled.get(), 10) == "after"


async def test_a_failing_handler_is_retried_up_to_the_limit_then_dead_lettered(broker: Broker) -> None:
    attempts = 0

    async def always_fails(event: Event[JobSubmitted]) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("disk on fire")

    await broker.consume(INGEST_QUEUE, {JOB_SUBMITTED: always_fails})
    await broker.publish(submitted())
    dead = await next_dead_letter(broker, timeout=20)
    assert attempts == broker.options.delivery_limit
    assert dead.headers[REASON_HEADER] == "handler_failed"
    assert "disk on fire" in dead.headers[DETAIL_HEADER]


async def test_a_transient_failure_succeeds_on_redelivery(broker: Broker) -> None:
    calls: list[str] = []
    done = asyncio.Event()

    async def flaky(event: Event[JobSubmitted]) -> None:
        calls.append(event.id)
        if len(calls) == 1:
            raise ConnectionError("blip")
        done.set()

    await broker.consume(INGEST_QUEUE, {JOB_SUBMITTED: flaky})
    await broker.publish(submitted())
    await asyncio.wait_for(done.wait(), 10)
    assert len(calls) == 2 and calls[0] == calls[1]


async def test_permanent_errors_skip_the_retries(broker: Broker) -> None:
    attempts = 0

    async def refuses(event: Event[JobSubmitted]) -> None:
        nonlocal attempts
        attempts += 1
        raise PermanentError("job_unknown", "no such job")

    await broker.consume(INGEST_QUEUE, {JOB_SUBMITTED: refuses})
    await broker.publish(submitted())
    dead = await next_dead_letter(broker)
    assert attempts == 1
    assert dead.headers[REASON_HEADER] == "job_unknown"


async def test_consume_refuses_handlers_for_events_the_queue_does_not_get(broker: Broker) -> None:
    async def nothing(event: Event[Any]) -> None:
        return None

    with pytest.raises(ValueError):
        await broker.consume(INGEST_QUEUE, {AUDIO_INGESTED: nothing})


async def test_the_consumer_span_is_a_child_of_the_producer_span(broker: Broker) -> None:
    EXPORTER.clear()
    done = asyncio.Event()

    async def ingest(event: Event[JobSubmitted]) -> None:
        done.set()

    await broker.consume(INGEST_QUEUE, {JOB_SUBMITTED: ingest})
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("root") as root:
        await broker.publish(submitted())
    await asyncio.wait_for(done.wait(), 10)
    await asyncio.sleep(0.05)
    spans = EXPORTER.get_finished_spans()
    producer = next(s for s in spans if s.kind == SpanKind.PRODUCER)
    consumer = next(s for s in spans if s.kind == SpanKind.CONSUMER)
    assert producer.context.trace_id == root.get_span_context().trace_id
    assert consumer.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    assert consumer.attributes["messaging.system"] == "rabbitmq"
    assert producer.attributes["messaging.message.id"] == consumer.attributes["messaging.message.id"]


async def test_queues_are_quorum_queues_with_a_delivery_limit(broker: Broker) -> None:
    queue = await broker.declare_queue(INGEST_QUEUE)
    # Redeclaring with other arguments fails: the broker holds exactly these.
    connection = await aio_pika.connect(broker.url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await channel.declare_queue(queue.name, durable=True, arguments={"x-queue-type": "classic"})


async def test_queue_depth_follows_the_queue(broker: Broker) -> None:
    """Each call asks the broker: the depth moves as messages arrive and leave (a robust channel's cache of
    passive declares once kept the first count forever)."""
    queue = await broker.declare_queue(INGEST_QUEUE)
    assert await broker.queue_depth(INGEST_QUEUE) == 0
    connection = await aio_pika.connect(broker.url)
    async with connection:
        channel = await connection.channel()
        for _ in range(2):
            await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=queue.name)
        assert await broker.queue_depth(INGEST_QUEUE) == 2
        message = await (await channel.get_queue(queue.name, ensure=False)).get()
        await message.ack()
        assert await broker.queue_depth(INGEST_QUEUE) == 1


async def test_a_delivery_whose_channel_closed_is_not_dead_lettered(broker: Broker) -> None:
    """A lost connection closes the channel under a handler that then gives up on the message (its last
    allowed attempt, say). The broker has put the message back already and delivers it again: a dead-letter
    copy now would fail its job while that next delivery completes it."""
    queue = await broker.declare_queue(INGEST_QUEUE)
    await broker.publish(submitted())
    async with await aio_pika.connect(broker.url) as connection:
        channel = await connection.channel()
        message = await (await channel.get_queue(queue.name, ensure=False)).get()
        await channel.close()
        await broker.dead_letter(message, queue.name, "handler_failed", "RuntimeError: gave up")

    assert await ready_in(broker, broker.names.dead_letter_queue) == 0
    assert await broker.queue_depth(INGEST_QUEUE) == 1  # back in its queue, for its next delivery


async def test_a_redelivered_event_that_was_handled_is_not_worked_again(broker: Broker, stack: Any) -> None:
    import redis.asyncio as redis

    from stemflow_shared.idempotency import DoneMarks

    client = redis.from_url(stack.redis_url)
    marks = DoneMarks(client, f"{broker.names.namespace}:")
    calls: list[str] = []
    seen = asyncio.Event()
    second = asyncio.Event()

    async def ingest(event: Event[JobSubmitted]) -> None:
        calls.append(event.id)
        (second if seen.is_set() else seen).set()

    await broker.consume(INGEST_QUEUE, {JOB_SUBMITTED: ingest}, done_marks=marks)
    dedup_hits = REGISTRY.get_sample_value("stemflow_dedup_hits_total", {"kind": "event"}) or 0.0
    event = submitted("dup")
    await broker.publish(event)
    await asyncio.wait_for(seen.wait(), 10)
    assert await marks.is_done(broker.names.queue(INGEST_QUEUE), event.id)
    await broker.publish(event)  # the same event again, as a redelivery would bring it
    await broker.publish(submitted("other"))
    await asyncio.wait_for(second.wait(), 10)
    # Queues are FIFO: had the duplicate been worked, it would have come before "other".
    assert len(calls) == 2 and calls[0] == event.id and calls[1] != event.id
    assert REGISTRY.get_sample_value("stemflow_dedup_hits_total", {"kind": "event"}) == dedup_hits + 1
    await client.delete(f"{broker.names.namespace}:done:{broker.names.queue(INGEST_QUEUE)}:{event.id}")
    await client.aclose()


async def test_a_consumers_own_events_are_acked_unread_with_no_span(broker: Broker) -> None:
    """`own_events`: an event the consuming process published itself (the gateway's job.submitted, back through
    its own queue) is acked without a parse, a handler or a span; the others are handled as ever."""
    EXPORTER.clear()
    own, theirs = submitted("own"), submitted("theirs")
    handled: list[str] = []
    done = asyncio.Event()

    async def ingest(event: Event[JobSubmitted]) -> None:
        handled.append(event.id)
        done.set()

    await broker.consume(INGEST_QUEUE, {JOB_SUBMITTED: ingest}, own_events={own.id}.__contains__)
    acked_unread = REGISTRY.get_sample_value("stemflow_dedup_hits_total", {"kind": "own_event"}) or 0.0
    await broker.publish(own)
    await broker.publish(theirs)
    await asyncio.wait_for(done.wait(), 10)
    # Queues are FIFO: the own event came first, and was not handled.
    assert handled == [theirs.id]
    assert REGISTRY.get_sample_value("stemflow_dedup_hits_total", {"kind": "own_event"}) == acked_unread + 1
    assert await ready_in(broker, broker.names.queue(INGEST_QUEUE)) == 0  # acked, not left or requeued
    await asyncio.sleep(0.05)
    consumed = [s for s in EXPORTER.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert [s.attributes["messaging.message.id"] for s in consumed] == [theirs.id]


async def test_every_dead_letter_reaches_the_watch_with_its_queue_reason_and_job(broker: Broker) -> None:
    """Ours (invalid data, a failing handler) and the broker's own (its delivery limit) alike."""
    seen: list[Any] = []
    arrived = asyncio.Condition()

    async def watch(letter: Any) -> None:
        async with arrived:
            seen.append(letter)
            arrived.notify_all()

    async def failing(event: Event[Any]) -> None:
        raise RuntimeError("boom")

    await broker.consume(INGEST_QUEUE, {JOB_SUBMITTED: failing})
    await broker.consume_dead_letters(watch)
    await broker.publish(submitted("dl-handler"))
    invalid = {
        "specversion": "1.0",
        "id": "x",
        "source": "/t",
        "type": JOB_SUBMITTED.type,
        "data": {"job_id": "dl-bad"},
    }
    channel = broker._require_channel()
    await channel.default_exchange.publish(
        aio_pika.Message(json.dumps(invalid).encode()), routing_key=broker.names.queue(INGEST_QUEUE)
    )
    await channel.default_exchange.publish(aio_pika.Message(b"{nope"), routing_key=broker.names.queue(INGEST_QUEUE))

    # A queue of the topology that the broker itself dead-letters from: a consumer that always requeues.
    queue_name = f"{broker.names.namespace}.separator.htdemucs"
    connection = await aio_pika.connect(broker.url)
    async with connection:
        raw_channel = await connection.channel()
        queue = await raw_channel.get_queue(queue_name)

        async def requeue(message: Any) -> None:
            await message.nack(requeue=True)

        await queue.consume(requeue)
        await raw_channel.default_exchange.publish(
            aio_pika.Message(json.dumps({**invalid, "data": {"job_id": "dl-limit", "target": "htdemucs-4"}}).encode()),
            routing_key=queue_name,
        )

        async def all_four() -> None:
            async with arrived:
                await arrived.wait_for(lambda: len(seen) >= 4)

        await asyncio.wait_for(all_four(), 30)
    by_job = {letter.job_id: letter for letter in seen}
    assert by_job["dl-handler"].queue == "ingest" and by_job["dl-handler"].reason == "handler_failed"
    assert "boom" in by_job["dl-handler"].detail
    assert by_job["dl-handler"].event_type == JOB_SUBMITTED.type
    assert by_job["dl-bad"].reason == "invalid_data" and by_job["dl-bad"].queue == "ingest"
    assert by_job[None].reason == "malformed_json"
    limit = by_job["dl-limit"]
    assert (limit.queue, limit.reason, limit.target) == ("separator.htdemucs", "delivery_limit", "htdemucs-4")
