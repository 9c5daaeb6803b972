"""The limited HTTP protocol on a real uvicorn server: timeouts, keep-alive, head limits across requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stemflow_shared.httpserver import MAX_HEAD_BYTES, HttpLimits, http_server, listening_socket

LIMITS = HttpLimits(
    http_head_timeout_s=0.6, http_body_timeout_s=0.8, http_keep_alive_s=1.5, http_max_idle_connections=3
)
MARGIN_S = 2.0  # for a loaded machine: the timeouts under test are asserted with this much slack
SMALL_LIMIT = 1000  # /upload refuses declared bodies larger than this, without reading them

seen: dict[str, Any] = {}


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def upload(request: Request) -> Response:
    if int(request.headers.get("content-length", "0")) > SMALL_LIMIT:
        return JSONResponse({"code": "payload_too_large"}, status_code=413)
    if request.query_params.get("slow"):
        await asyncio.sleep(float(request.query_params["slow"]))  # the application, not the client, is slow
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
    except Exception as exc:  # the client went away or timed out
        seen["upload_error"] = type(exc).__name__
        raise
    return JSONResponse({"size": size})


def app() -> Starlette:
    return Starlette(routes=[Route("/healthz", healthz), Route("/upload", upload, methods=["POST"])])


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[tuple[str, int]]:
    sock = listening_socket("127.0.0.1", 0)  # listening already: connections wait in its backlog
    srv = http_server(app(), "127.0.0.1", 0, LIMITS, lifespan="off")
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    yield "127.0.0.1", sock.getsockname()[1]
    srv.should_exit = True
    await task


@contextlib.asynccontextmanager
async def connection(server: tuple[str, int]) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*server)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> tuple[bytes, float]:
    """Everything the server still sends until it closes, and how long that took; fails if it stays open."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    data = await asyncio.wait_for(reader.read(), seconds)
    return data, loop.time() - started


async def healthz_answers(server: tuple[str, int]) -> None:
    async with connection(server) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == 200


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(server: tuple[str, int]) -> None:
    async with connection(server) as (reader, _):
        await healthz_answers(server)
        data, took = await closed_within(reader, LIMITS.http_head_timeout_s + MARGIN_S)
    assert data == b""  # nothing was asked: nothing is answered
    assert took >= LIMITS.http_head_timeout_s * 0.9


async def test_half_a_request_head_is_answered_408_and_closed(server: tuple[str, int]) -> None:
    async with connection(server) as (reader, writer):
        writer.write(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Le")
        await healthz_answers(server)
        data, took = await closed_within(reader, LIMITS.http_head_timeout_s + MARGIN_S)
    assert data.startswith(b"HTTP/1.1 408 ")
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["code"] == "request_timeout" and b"application/problem+json" in data
    assert took >= LIMITS.http_head_timeout_s * 0.9


async def test_a_stalled_body_is_answered_408_and_the_application_sees_the_client_go(
    server: tuple[str, int],
) -> None:
    seen.clear()
    async with connection(server) as (reader, writer):
        writer.write(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\n\r\n" + b"x" * 100)
        await healthz_answers(server)
        data, took = await closed_within(reader, LIMITS.http_body_timeout_s + MARGIN_S)
    assert data.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in data
    assert took >= LIMITS.http_body_timeout_s * 0.9
    assert seen.get("upload_error") == "ClientDisconnect"


async def test_a_slow_application_is_not_the_clients_timeout(server: tuple[str, int]) -> None:
    body = b"x" * 900
    slow = LIMITS.http_body_timeout_s * 2
    async with connection(server) as (reader, writer):
        writer.write(b"POST /upload?slow=%g HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (slow, len(body)))
        writer.write(body)
        status, _, answer = await read_response(reader)
    assert status == 200 and json.loads(answer) == {"size": len(body)}


async def test_keep_alive_outlasts_a_pause_then_closes(server: tuple[str, int]) -> None:
    async with connection(server) as (reader, writer):
        for _ in range(2):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_response(reader))[0] == 200
            # Idle for longer than the head timeout: a keep-alive connection waits for the keep-alive time.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), LIMITS.http_head_timeout_s * 1.5)
        data, took = await closed_within(reader, LIMITS.http_keep_alive_s + MARGIN_S)
    assert data == b""
    assert took >= LIMITS.http_keep_alive_s - LIMITS.http_head_timeout_s * 1.5 - 0.1


async def test_a_request_after_an_early_413_on_the_same_connection_is_served(server: tuple[str, int]) -> None:
    """The refused body's tail, the next head and a large body arrive together: the head limit must not count
    that body as head bytes (it used to answer 431)."""
    big = b"y" * (MAX_HEAD_BYTES * 16)
    async with connection(server) as (reader, writer):
        writer.write(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" + b"z" * 100)
        status, _, _ = await read_response(reader)
        assert status == 413
        writer.write(b"z" * 4900 + b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 900\r\n\r\n" + b"y" * 900)
        assert (await read_response(reader))[0] == 200
        # Declared larger than the route takes: answered early, its 1 MB body discarded, not counted as a head.
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nPOST /upload HTTP/1.1\r\nHost: t\r\n")
        writer.write(b"Content-Length: %d\r\n\r\n" % len(big) + big)
        assert (await read_response(reader))[0] == 200
        assert (await read_response(reader))[0] == 413  # declared > SMALL_LIMIT: refused, but not as 431
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await read_response(reader))[0] == 200


async def test_pipelined_requests_are_each_answered(server: tuple[str, int]) -> None:
    async with connection(server) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 3 + b"POST /upload HTTP/1.1\r\nHost: t\r\n")
        writer.write(
            b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(b"200\r\n" + b"q" * 512 + b"\r\n" for _ in range(400))
        )
        writer.write(b"0\r\n\r\n")
        statuses = [(await read_response(reader))[0] for _ in range(3)]
        status, headers, body = await read_response(reader)
    assert statuses == [200, 200, 200]
    assert status == 200 and json.loads(body) == {"size": 512 * 400}, headers


async def test_a_head_over_the_limit_is_431_and_a_malformed_request_is_a_problem(server: tuple[str, int]) -> None:
    async with connection(server) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 10))
        data, _ = await closed_within(reader, MARGIN_S)
    assert data.startswith(b"HTTP/1.1 431 ") and b'"headers_too_large"' in data
    async with connection(server) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
        data, _ = await closed_within(reader, MARGIN_S)
    assert data.startswith(b"HTTP/1.1 400 ")
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"content-type: application/problem+json" in head.lower()
    assert json.loads(body)["code"] == "malformed_request"


async def test_idle_connections_beyond_the_cap_are_closed_oldest_first(server: tuple[str, int]) -> None:
    async with contextlib.AsyncExitStack() as stack:
        conns = [
            await stack.enter_async_context(connection(server)) for _ in range(LIMITS.http_max_idle_connections + 2)
        ]
        for reader, writer in conns:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_response(reader))[0] == 200
        for reader, _ in conns[:2]:
            assert (await closed_within(reader, MARGIN_S))[0] == b""
        for reader, writer in conns[2:]:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_response(reader))[0] == 200
