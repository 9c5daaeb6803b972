"""Webhooks against a local HTTP receiver: signature, retries with backoff, giving up, SSRF rules."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import httpx
import pytest
import pytest_asyncio
import uvicorn

from notifier.public import public_json
from notifier.webhooks import Policy, Webhooks
from stemflow_shared.messaging import PermanentError
from stemflow_shared.metrics import REGISTRY
from stemflow_shared.topology import REASON_HEADER, Names


class Receiver:
    """An HTTP endpoint that records every request (and when it came) and answers with the statuses it is
    given (a status, or a status and headers), then 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.arrivals: dict[str, list[float]] = {}
        self.answers: dict[str, list[int | tuple[int, dict[str, str]]]] = {}
        self._arrived = asyncio.Condition()
        self.base_url = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.arrivals.setdefault(scope["path"], []).append(asyncio.get_running_loop().time())
        queued = self.answers.get(scope["path"], [])
        answer = queued.pop(0) if queued else 200
        status, extra = answer if isinstance(answer, tuple) else (answer, {})
        response_headers = [(b"content-length", b"0"), *((k.encode(), v.encode()) for k, v in extra.items())]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": b""})
        async with self._arrived:
            self.requests.append((scope["path"], headers, body))
            self._arrived.notify_all()

    def at(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for p, headers, body in self.requests if p == path]

    async def wait(self, path: str, count: int) -> list[tuple[dict[str, str], bytes]]:
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.at(path)) >= count), 20)
        return self.at(path)


@pytest_asyncio.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    sink = Receiver()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sink.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(sink, log_config=None, lifespan="off", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield sink
    finally:
        server.should_exit = True
        await task


@pytest_asyncio.fixture(scope="module")
async def notifier(kit: Any, notifier_env: dict[str, str]) -> AsyncIterator[Any]:
    async with kit.running_notifier(notifier_env, replica_id=kit.replica("webhooks")) as running:
        yield running


@pytest_asyncio.fixture(scope="module")
async def dead_letters(notifier_env: dict[str, str]) -> AsyncIterator[Any]:
    """Find a message in the namespace's dead-letter queue by id; returns its reason header."""
    connection = await aio_pika.connect(notifier_env["AMQP_URL"])
    channel = await connection.channel()
    queue = await channel.get_queue(Names(notifier_env["STEMFLOW_NAMESPACE"]).dead_letter_queue)

    async def reason_of(message_id: str) -> str:
        async with asyncio.timeout(20), queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                if message.message_id == message_id:
                    return str((message.headers or {})[REASON_HEADER])
        raise AssertionError("unreachable")

    try:
        yield reason_of
    finally:
        await connection.close()


def verify(headers: dict[str, str], body: bytes, secret: str) -> None:
    """What a receiver does: recompute the HMAC over "<t>.<body>" and compare in constant time."""
    parts = dict(part.split("=", 1) for part in headers["stemflow-signature"].split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)


async def test_a_completed_job_is_posted_signed_with_the_event_as_body(
    kit: Any, notifier: Any, receiver: Receiver, feed: Any
) -> None:
    job = await feed.job("hooked", callback_url=f"{receiver.base_url}/done")
    event = await feed.completed("hooked", job)
    ((headers, body),) = await receiver.wait("/done", 1)
    verify(headers, body, kit.webhook_secret)
    assert json.loads(body) == json.loads(public_json(event.envelope))
    assert "owner" not in json.loads(body)["data"]
    assert headers["content-type"] == "application/cloudevents+json"
    assert headers["stemflow-event-id"] == event.id
    assert headers["stemflow-event-type"] == "job.completed"
    assert headers["stemflow-attempt"] == "1"


async def test_a_receiver_that_fails_twice_gets_the_webhook_on_the_third_attempt(
    kit: Any, notifier: Any, receiver: Receiver, feed: Any
) -> None:
    receiver.answers["/flaky"] = [503, 503]
    job = await feed.job("hooked", callback_url=f"{receiver.base_url}/flaky")
    event = await feed.failed("hooked", job)
    attempts = await receiver.wait("/flaky", 3)
    assert [h["stemflow-attempt"] for h, _ in attempts] == ["1", "2", "3"]
    assert {h["stemflow-event-id"] for h, _ in attempts} == {event.id}
    assert {h["stemflow-event-type"] for h, _ in attempts} == {"job.failed"}
    for headers, body in attempts:
        verify(headers, body, kit.webhook_secret)
    # WEBHOOK_BACKOFF_S is 0.05 s, doubling, less up to 10% of jitter.
    first, second, third = receiver.arrivals["/flaky"]
    assert second - first >= 0.045 and third - second >= 0.09


async def test_retry_after_is_honoured(notifier: Any, receiver: Receiver, feed: Any) -> None:
    receiver.answers["/busy"] = [(429, {"retry-after": "1"})]
    job = await feed.job("hooked", callback_url=f"{receiver.base_url}/busy")
    await feed.completed("hooked", job)
    await receiver.wait("/busy", 2)
    first, second = receiver.arrivals["/busy"]
    assert second - first >= 1.0


async def test_a_redirect_is_not_followed_nor_retried(
    notifier: Any, receiver: Receiver, feed: Any, dead_letters: Any
) -> None:
    receiver.answers["/moved"] = [(307, {"location": f"{receiver.base_url}/elsewhere"})] * 10
    job = await feed.job("hooked", callback_url=f"{receiver.base_url}/moved")
    event = await feed.completed("hooked", job)
    assert await dead_letters(event.id) == "webhook_rejected"
    # Asking again would be answered the same: one attempt, and nothing sent where it pointed.
    assert len(receiver.at("/moved")) == 1 and receiver.at("/elsewhere") == []


async def test_a_receiver_that_keeps_failing_is_given_up_and_dead_lettered(
    notifier: Any, receiver: Receiver, feed: Any, dead_letters: Any
) -> None:
    given_up = REGISTRY.get_sample_value("stemflow_webhook_deliveries_total", {"outcome": "given_up"}) or 0.0
    receiver.answers["/down"] = [500] * 10
    job = await feed.job("hooked", callback_url=f"{receiver.base_url}/down")
    event = await feed.completed("hooked", job)
    assert await dead_letters(event.id) == "webhook_failed"
    assert len(receiver.at("/down")) == 4  # WEBHOOK_MAX_ATTEMPTS
    assert REGISTRY.get_sample_value("stemflow_webhook_deliveries_total", {"outcome": "given_up"}) == given_up + 1


async def test_a_client_error_is_given_up_at_once(
    notifier: Any, receiver: Receiver, feed: Any, dead_letters: Any
) -> None:
    receiver.answers["/gone"] = [410]
    job = await feed.job("hooked", callback_url=f"{receiver.base_url}/gone")
    event = await feed.completed("hooked", job)
    assert await dead_letters(event.id) == "webhook_rejected"
    assert len(receiver.at("/gone")) == 1


async def test_jobs_without_a_callback_url_are_not_called_back(notifier: Any, receiver: Receiver, feed: Any) -> None:
    quiet = await feed.completed("hooked", await feed.job("hooked"))
    await feed.completed("hooked", await feed.job("hooked", callback_url=f"{receiver.base_url}/after"))
    await receiver.wait("/after", 1)
    assert all(h["stemflow-event-id"] != quiet.id for _, h, _ in receiver.requests)


async def test_private_addresses_are_refused_unless_allowed(receiver: Receiver) -> None:
    async with httpx.AsyncClient() as http:
        strict = Webhooks(http, gateway=None, secret=b"s", policy=Policy(allow_private=False))
        by_name = receiver.base_url.replace("127.0.0.1", "localhost")
        for url in (f"{receiver.base_url}/private", f"{by_name}/private", "ftp://example.com/hook"):
            with pytest.raises(PermanentError) as refused:
                await strict.deliver(url, b"{}", "e1", "job.completed")
            assert refused.value.code == "webhook_rejected", url
        assert receiver.at("/private") == []
        lenient = Webhooks(http, gateway=None, secret=b"s", policy=Policy(allow_private=True))
        await lenient.deliver(f"{receiver.base_url}/private", b"{}", "e2", "job.completed")
        assert len(receiver.at("/private")) == 1
        with pytest.raises(PermanentError) as metadata:
            await lenient.deliver("http://169.254.169.254/latest/meta-data", b"{}", "e3", "job.completed")
        assert metadata.value.code == "webhook_rejected"


def test_backoff_doubles_honours_retry_after_and_is_capped() -> None:
    policy = Policy(backoff_s=1.0, backoff_max_s=30.0)
    delays = [policy.delay(attempt, None) for attempt in range(1, 8)]
    for attempt, delay in enumerate(delays, start=1):
        assert min(0.9 * 2 ** (attempt - 1), 30.0) <= delay <= min(2 ** (attempt - 1), 30.0)
    assert delays[-1] == 30.0
    assert policy.delay(1, retry_after=12.0) == 12.0
    assert policy.delay(1, retry_after=3600.0) == 30.0


async def test_a_delivery_leaves_no_cycle_behind(kit: Any, receiver: Receiver) -> None:
    """What a middle collection catches in flight is frozen (notifier.heap): a cycle in it would never be freed."""
    policy = Policy(max_attempts=1, backoff_s=1.0, backoff_max_s=1.0, timeout_s=10.0, allow_private=True)
    async with httpx.AsyncClient() as http:
        webhooks = Webhooks(http, None, kit.webhook_secret.encode(), policy)  # type: ignore[arg-type]
        url = f"{receiver.base_url}/acyclic"
        assert (await webhooks._attempt(url, b"{}", "event-0", "job.completed", 1)).outcome == "delivered"
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            receiver.answers["/acyclic"] = [503]
            for attempt in (1, 2):
                await webhooks._attempt(url, b"{}", f"event-{attempt}", "job.completed", attempt)
            gc.collect()
            cyclic = {type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith(("httpx", "httpcore"))}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert cyclic == set()
