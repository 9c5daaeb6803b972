"""RabbitMQ messaging with aio-pika: topology, confirmed publishing, safe consuming.

The rules live here once: messages are acked only after the handler's effects
and its outgoing events are durable (publisher confirms); invalid events are
dead-lettered at once with the reason in headers; a failing handler is retried
up to the delivery limit and then dead-lettered with the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import metrics
from .events import AUDIO_INGESTED, CONTENT_TYPE, JOB_ID, Event, EventError, EventSpec, parse_event
from .idempotency import DoneMarks
from .telemetry import extract_context, inject_headers, job_context, tracer
from .topology import (
    DETAIL_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    ROUTED_EVENTS,
    SERVICE_HEADER,
    SHARED_QUEUES,
    Names,
    QueueSpec,
    routing_headers,
)

log = logging.getLogger(__name__)

Handler = Callable[[Event[Any]], Awaitable[Iterable[Event[Any]] | None]]

_RETRYABLE = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    asyncio.TimeoutError,
)


DEAD_LETTER_WATCH_ATTEMPTS = 20


@dataclass(frozen=True)
class DeadLetter:
    """What a dead-lettered message says about itself: where it failed, why, and whose job it was."""

    queue: str  # the queue it left, without the namespace (e.g. `separator.htdemucs`)
    reason: str  # our reason (`handler_failed`, `invalid_data`, ...) or the broker's (`delivery_limit`, ...)
    detail: str
    event_type: str | None
    job_id: str | None
    target: str | None
    mix_id: str | None = None  # the practice mix the message was about (mix.* events)


def read_dead_letter(message: AbstractIncomingMessage, names: Names) -> DeadLetter:
    """Read a dead letter leniently: its body may be the very thing that could not be parsed."""
    headers = message.headers or {}
    queue, reason, detail = headers.get(QUEUE_HEADER), headers.get(REASON_HEADER), headers.get(DETAIL_HEADER, "")
    if reason is None:  # dead-lettered by the broker (delivery limit, rejection, expiry)
        deaths = headers.get("x-death") or [{}]
        first = deaths[0] if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], dict) else {}
        reason = headers.get("x-first-death-reason") or first.get("reason") or "unknown"
        queue = headers.get("x-first-death-queue") or first.get("queue")
        detail = f"dead-lettered by the broker ({reason})"
    event_type = job_id = target = mix_id = None
    try:
        raw = json.loads(message.body)
    except (ValueError, UnicodeDecodeError):
        raw = None
    if isinstance(raw, dict):
        event_type = raw.get("type") if isinstance(raw.get("type"), str) else None
        data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        for candidate in (data.get("job_id"), raw.get("subject")):
            if isinstance(candidate, str) and JOB_ID.fullmatch(candidate):
                job_id = candidate
                break
        target = data.get("target") if isinstance(data.get("target"), str) else None
        mix_id = data.get("mix_id") if isinstance(data.get("mix_id"), str) else None
    return DeadLetter(
        queue=names.short_queue(_text(queue)),
        reason=_text(reason),
        detail=_text(detail),
        event_type=event_type,
        job_id=job_id,
        target=target,
        mix_id=mix_id,
    )


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


class PermanentError(Exception):
    """A handler error that retrying cannot fix: dead-letter the message at once."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass
class BrokerOptions:
    delivery_limit: int = 5
    prefetch: int = 8
    publish_attempts: int = 8
    confirm_timeout_s: float = 15.0
    retry_backoff_s: float = 0.2
    # Queues of replicas that went away (per-replica queues) are deleted after this idle time.
    replica_queue_expiry_ms: int = 3_600_000


def queue_arguments(names: Names, options: BrokerOptions, *, per_replica: bool = False) -> dict[str, Any]:
    """Durable quorum queue with a delivery limit, dead-lettering at least once."""
    args: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": options.delivery_limit,
        "x-dead-letter-exchange": names.dead_letter_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    if per_replica:
        args["x-expires"] = options.replica_queue_expiry_ms
    return args


class Broker:
    """One robust connection per process: a confirm channel to publish, a channel per consumer."""

    def __init__(self, url: str, names: Names, service: str, options: BrokerOptions | None = None) -> None:
        self.url = url
        self.names = names
        self.service = service
        self.options = options or BrokerOptions()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        self._consumers: list[Consumer] = []
        self._inspect: AbstractChannel | None = None

    async def connect(self) -> Broker:
        self._connection = await aio_pika.connect_robust(self.url, client_properties={"connection_name": self.service})
        self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await self._declare_exchanges(self._channel)
        for spec in SHARED_QUEUES:
            await self.declare_queue(spec)
        return self

    async def _declare_exchanges(self, channel: AbstractChannel) -> None:
        self._exchange = await channel.declare_exchange(self.names.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        work = await channel.declare_exchange(self.names.work_exchange, aio_pika.ExchangeType.HEADERS, durable=True)
        await work.bind(self._exchange, AUDIO_INGESTED.routing_key)
        self._dlx = await channel.declare_exchange(
            self.names.dead_letter_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        dead = await channel.declare_queue(
            self.names.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(self._dlx, "#")
        # No dead-letter exchange of its own: a copy that cannot be settled is dropped, the kept one stays above.
        watch = await channel.declare_queue(
            self.names.dead_letter_watch_queue,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_WATCH_ATTEMPTS},
        )
        await watch.bind(self._dlx, "#")

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed and self._channel is not None

    async def ready(self) -> bool:
        """Readiness check: the connection and the publishing channel are open."""
        return self.connected

    async def declare_queue(
        self, spec: QueueSpec, *, replica: str | None = None, channel: AbstractChannel | None = None
    ) -> AbstractQueue:
        """Declare a service's input queue and bind it to its events."""
        channel = channel or self._require_channel()
        queue = await channel.declare_queue(
            self.names.queue(spec, replica),
            durable=True,
            arguments=queue_arguments(self.names, self.options, per_replica=spec.per_replica),
        )
        if spec.match:
            await queue.bind(self.names.work_exchange, arguments={"x-match": "all", **dict(spec.match)})
        else:
            for key in spec.routing_keys:
                await queue.bind(self.names.exchange, key)
        return queue

    async def queue_depth(self, spec: QueueSpec, replica: str | None = None) -> int:
        """Messages ready in one of the topology's queues (a passive declare on a channel of its own)."""
        if self._connection is None:
            raise RuntimeError("Broker.connect() was not called")
        if self._inspect is None or self._inspect.is_closed:
            self._inspect = await self._connection.channel(publisher_confirms=False)
        # Not robust: a robust channel answers a passive declare of a name it declared before from its own
        # cache, with that first declaration's count, and the depth would never change.
        queue = await self._inspect.declare_queue(self.names.queue(spec, replica), passive=True, robust=False)
        result = queue.declaration_result
        return int(result.message_count or 0) if result is not None else 0

    async def publish(self, event: Event[Any], *, priority: int | None = None) -> None:
        """Publish with a publisher confirm, retrying across reconnects."""
        routing_key = event.spec.routing_key
        with tracer().start_as_current_span(
            f"publish {routing_key}",
            kind=SpanKind.PRODUCER,
            attributes=_messaging_attributes(self.names.exchange, routing_key, event, "publish"),
        ):
            headers: dict[str, Any] = routing_headers(event)
            inject_headers(headers)
            message = aio_pika.Message(
                body=event.envelope.to_json(),
                content_type=CONTENT_TYPE,
                message_id=event.id,
                type=event.envelope.type,
                app_id=self.service,
                timestamp=event.envelope.time,
                headers=headers,
                priority=priority,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await self._publish_confirmed(
                self._require_exchange, message, routing_key, event.spec.name, mandatory=routing_key in ROUTED_EVENTS
            )

    async def _publish_confirmed(
        self,
        exchange_of: Callable[[], AbstractExchange],
        message: aio_pika.Message,
        routing_key: str,
        label: str,
        *,
        mandatory: bool = True,
    ) -> None:
        delay = self.options.retry_backoff_s
        for attempt in range(1, self.options.publish_attempts + 1):
            try:
                await exchange_of().publish(
                    message, routing_key, mandatory=mandatory, timeout=self.options.confirm_timeout_s
                )
                metrics.MESSAGES_PUBLISHED.labels(label, "confirmed").inc()
                return
            except aiormq.exceptions.PublishError:
                metrics.MESSAGES_PUBLISHED.labels(label, "unroutable").inc()
                raise
            except (*_RETRYABLE, aiormq.exceptions.DeliveryError) as exc:
                metrics.MESSAGES_PUBLISHED.labels(label, "retried").inc()
                if attempt == self.options.publish_attempts:
                    metrics.MESSAGES_PUBLISHED.labels(label, "failed").inc()
                    raise
                log.warning("publish of %s failed (%s), retrying", label, exc.__class__.__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _require_channel(self) -> AbstractChannel:
        if self._channel is None:
            raise RuntimeError("Broker.connect() was not called")
        return self._channel

    def _require_exchange(self) -> AbstractExchange:
        if self._exchange is None:
            raise RuntimeError("Broker.connect() was not called")
        return self._exchange

    def _require_dlx(self) -> AbstractExchange:
        if self._dlx is None:
            raise RuntimeError("Broker.connect() was not called")
        return self._dlx

    async def dead_letter(self, message: AbstractIncomingMessage, queue: str, reason: str, detail: str) -> None:
        """Send a copy with the reason in headers to the dead-letter exchange, then ack the original.

        Not for a delivery whose channel has closed: the broker has put that message back already, and its
        next delivery is the one to settle (a copy now would end a job whose message is still worked).
        """
        if not _delivery_open(message):
            log.warning("not dead-lettering a message from %s whose channel closed; it is redelivered", queue)
            return
        headers = dict(message.headers or {})
        headers.update(
            {REASON_HEADER: reason, DETAIL_HEADER: detail[:1000], QUEUE_HEADER: queue, SERVICE_HEADER: self.service}
        )
        copy = aio_pika.Message(
            body=message.body,
            content_type=message.content_type,
            message_id=message.message_id,
            type=message.type,
            app_id=message.app_id,
            timestamp=message.timestamp,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._publish_confirmed(self._require_dlx, copy, message.routing_key or "", "dead-letter")
        await message.ack()
        metrics.MESSAGES_DEAD_LETTERED.labels(queue, reason).inc()
        log.warning("dead-lettered a message from %s: %s (%s)", queue, reason, detail[:200])

    async def consume_dead_letters(self, handler: Callable[[DeadLetter], Awaitable[None]]) -> None:
        """Hand every dead letter to `handler` (once it returns, the watch copy is acked; the kept copy stays).

        A handler that raises is retried with a pause, up to DEAD_LETTER_WATCH_ATTEMPTS deliveries.
        """
        if self._connection is None:
            raise RuntimeError("Broker.connect() was not called")
        channel = await self._connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.options.prefetch)
        queue = await channel.declare_queue(self.names.dead_letter_watch_queue, passive=True)

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                await handler(read_dead_letter(message, self.names))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("a dead letter could not be settled, retrying: %s", exc)
                await asyncio.sleep(min(self.options.retry_backoff_s * 2 ** _delivery_count(message), 5.0))
                with contextlib.suppress(*_RETRYABLE):
                    await message.nack(requeue=True)
                return
            with contextlib.suppress(*_RETRYABLE):
                await message.ack()

        await queue.consume(on_message, no_ack=False)

    async def consume(
        self,
        spec: QueueSpec,
        handlers: Mapping[EventSpec[Any], Handler],
        *,
        replica: str | None = None,
        prefetch: int | None = None,
        done_marks: DoneMarks | None = None,
        own_events: Callable[[str], bool] | None = None,
    ) -> Consumer:
        """Start consuming a service's queue; events are dispatched to handlers by type.

        With `done_marks`, an event whose handling completed (effects durable, outputs
        confirmed) is remembered by id, and a redelivery of it is acked without rework.
        With `own_events`, a message whose id it answers true for (an event this process
        published, come back through its own queue) is acked unread: no parse, no handler,
        no span (a traced job's trace holds the consumers that did work on the event).
        """
        if self._connection is None:
            raise RuntimeError("Broker.connect() was not called")
        unknown = set(handlers) - set(spec.events)
        if unknown:
            raise ValueError(f"queue {spec.name} is not bound to {sorted(s.name for s in unknown)}")
        channel = await self._connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch or self.options.prefetch)
        queue = await self.declare_queue(spec, replica=replica, channel=channel)
        consumer = Consumer(self, channel, queue, {s.name: h for s, h in handlers.items()}, done_marks, own_events)
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def stop_consuming(self, grace_s: float) -> None:
        """Stop taking messages, let in-flight handlers finish within the grace period."""
        await asyncio.gather(*(c.stop(grace_s) for c in self._consumers), return_exceptions=True)

    async def close(self) -> None:
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()


@dataclass
class Consumer:
    broker: Broker
    channel: AbstractChannel
    queue: AbstractQueue
    handlers: dict[str, Handler]
    done_marks: DoneMarks | None = None
    own_events: Callable[[str], bool] | None = None
    _tag: str | None = None
    _in_flight: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> None:
        self._tag = await self.queue.consume(self._on_message, no_ack=False)

    async def stop(self, grace_s: float) -> None:
        if self._tag is not None:
            try:
                await self.queue.cancel(self._tag)
            except _RETRYABLE:
                pass
            self._tag = None
        current = asyncio.current_task()
        pending = [t for t in self._in_flight if t is not current]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for task in late:
                task.cancel()
        # Unacked messages go back to the queue when the channel closes.
        if not self.channel.is_closed:
            await self.channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            await self._handle(message)
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        queue = self.queue.name
        attempts = _delivery_count(message) + 1
        if attempts > 1 or message.redelivered:
            metrics.MESSAGES_REDELIVERED.labels(queue).inc()
        if self.own_events is not None and message.message_id and self.own_events(message.message_id):
            # Counted here only: the consumed and acked counters are of the messages handlers took.
            metrics.DEDUP_HITS.labels("own_event").inc()
            await message.ack()
            return
        parent = extract_context(message.headers)
        span_name = f"process {message.routing_key or queue}"
        with tracer().start_as_current_span(span_name, context=parent, kind=SpanKind.CONSUMER) as span:
            span.set_attributes(
                {
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": message.exchange or "",
                    "messaging.rabbitmq.destination.routing_key": message.routing_key or "",
                    "messaging.consumer.group.name": queue,
                    "messaging.message.id": message.message_id or "",
                    "messaging.message.body.size": len(message.body),
                }
            )
            try:
                event = parse_event(message.body)
            except EventError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.code))
                await self.broker.dead_letter(message, queue, exc.code, exc.detail)
                return
            handler = self.handlers.get(event.spec.name)
            if handler is None:
                await self.broker.dead_letter(
                    message, queue, "no_handler", f"{queue} does not handle {event.spec.name}"
                )
                return
            span.set_attribute("cloudevents.event_type", event.envelope.type)
            span.set_attribute("cloudevents.event_subject", event.envelope.subject or "")
            await self._run_handler(message, event, handler, attempts, span)

    async def _run_handler(
        self, message: AbstractIncomingMessage, event: Event[Any], handler: Handler, attempts: int, span: Any
    ) -> None:
        queue = self.queue.name
        metrics.MESSAGES_CONSUMED.labels(queue, event.spec.name).inc()
        if attempts == 1 and not message.redelivered and event.envelope.time is not None:
            # Publisher and consumer clocks differ by a little; a negative wait is clock skew, not time.
            waited = (datetime.now(UTC) - event.envelope.time).total_seconds()
            metrics.QUEUE_WAIT.labels(queue).observe(max(waited, 0.0))
        in_progress = metrics.MESSAGES_IN_PROGRESS.labels(queue)
        in_progress.inc()
        started = time.perf_counter()
        try:
            if self.done_marks is not None and await self.done_marks.is_done(queue, event.id):
                span.set_attribute("stemflow.duplicate", True)
                metrics.DEDUP_HITS.labels("event").inc()
                log.info("event %s was already handled; acking the redelivery", event.id)
                await message.ack()
                metrics.MESSAGES_ACKED.labels(queue).inc()
                return
            with job_context(getattr(event.data, "job_id", None)):
                outgoing = await handler(event)
                for out in outgoing or ():
                    await self.broker.publish(out)
            if self.done_marks is not None:
                await self.done_marks.mark_done(queue, event.id)
            await message.ack()
            metrics.MESSAGES_ACKED.labels(queue).inc()
        except PermanentError as exc:
            span.set_status(Status(StatusCode.ERROR, exc.code))
            await self.broker.dead_letter(message, queue, exc.code, exc.detail)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            await self._retry_or_dead_letter(message, queue, attempts, exc)
        finally:
            in_progress.dec()
            metrics.HANDLER_DURATION.labels(queue, event.spec.name).observe(time.perf_counter() - started)

    async def _retry_or_dead_letter(
        self, message: AbstractIncomingMessage, queue: str, attempts: int, exc: Exception
    ) -> None:
        detail = f"{type(exc).__name__}: {exc}"
        if not _delivery_open(message):
            # A lost connection (the failure may be the ack itself): the broker has put the message back and
            # delivers it again, where a done mark stops rework. This delivery is over; nothing to settle.
            log.warning("the delivery from %s ended with its channel (%s); the broker redelivers it", queue, detail)
            return
        try:
            if attempts >= self.broker.options.delivery_limit:
                await self.broker.dead_letter(message, queue, "handler_failed", detail)
                return
            log.warning("handler failed on attempt %d, requeueing: %s", attempts, detail, exc_info=exc)
            # A short pause before requeueing keeps a failing dependency from turning into a hot loop.
            await asyncio.sleep(min(self.broker.options.retry_backoff_s * 2 ** (attempts - 1), 5.0))
            await message.nack(requeue=True)
            metrics.MESSAGES_REQUEUED.labels(queue).inc()
        except _RETRYABLE:
            # The channel is gone; the broker requeues the unacked message by itself.
            log.warning("could not settle a failed message on %s; the broker will redeliver it", queue)


def _delivery_open(message: AbstractIncomingMessage) -> bool:
    """Whether the channel that delivered `message` is still open, so that it can be acked or rejected."""
    try:
        return not message.channel.is_closed
    except aiormq.exceptions.ChannelInvalidStateError:
        return False


def _delivery_count(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get("x-delivery-count", 0)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def _messaging_attributes(destination: str, routing_key: str, event: Event[Any], operation: str) -> dict[str, Any]:
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": operation,
        "messaging.destination.name": destination,
        "messaging.rabbitmq.destination.routing_key": routing_key,
        "messaging.message.id": event.id,
        "cloudevents.event_id": event.id,
        "cloudevents.event_type": event.envelope.type,
        "cloudevents.event_subject": event.envelope.subject or "",
    }
