"""Slow and broken clients against the running services: cut off within the configured timeouts, while
/healthz keeps answering; an abandoned upload counts as the client's (499, 408), never as a 500."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest

from stemflow_shared.httpserver import HttpLimits

pytestmark = pytest.mark.integration

MARGIN_S = 5.0  # slack over each timeout under test, for a loaded machine


def limits_of(system: Any) -> HttpLimits:
    return HttpLimits(**{k.lower(): v for k, v in system.env.items() if k.startswith("HTTP_")})


async def held(port: int, first_bytes: bytes, timeout_s: float) -> tuple[bytes, float]:
    """Open a connection, send `first_bytes` (maybe nothing), then wait for the server to hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        if first_bytes:
            writer.write(first_bytes)
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout_s)
        return answer, loop.time() - started
    finally:
        writer.close()


def status_of(answer: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return int(match.group(1)) if match else None


async def test_idle_half_head_and_half_body_connections_are_closed_in_time(system: Any, api_key: str) -> None:
    limits = limits_of(system)
    half_body = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + api_key.encode() + b"\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n"
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + b"\0" * 1000
    )
    half_head = b"GET /v1/jobs HTTP/1.1\r\nHost: gw\r\nAuthoriz"
    servers = {
        "gateway": system.ports.gateway,
        "notifier": system.ports.notifier,
        "ingest": system.ports.ingest,
        "gateway metrics": system.ports.gateway_metrics,
    }
    cases = {
        "gateway idle": (system.ports.gateway, b"", limits.http_head_timeout_s),
        "gateway half head": (system.ports.gateway, half_head, limits.http_head_timeout_s),
        "gateway half body": (system.ports.gateway, half_body, limits.http_body_timeout_s),
        "notifier half head": (system.ports.notifier, half_head, limits.http_head_timeout_s),
        "notifier idle": (system.ports.notifier, b"", limits.http_head_timeout_s),
        "ingest ops half head": (system.ports.ingest, half_head, limits.http_head_timeout_s),
        "gateway metrics half head": (system.ports.gateway_metrics, half_head, limits.http_head_timeout_s),
    }
    tasks = {
        name: asyncio.create_task(held(port, data, limit + MARGIN_S)) for name, (port, data, limit) in cases.items()
    }
    async with httpx.AsyncClient(timeout=10) as http:
        while not all(task.done() for task in tasks.values()):
            for name, port in servers.items():
                path = "/metrics" if name == "gateway metrics" else "/healthz"
                assert (await http.get(f"http://127.0.0.1:{port}{path}")).status_code == 200, name
            await asyncio.wait(tasks.values(), timeout=1.0)
    for name, task in tasks.items():
        answer, took = task.result()  # a TimeoutError here: held past the timeout
        expected = None if name.endswith("idle") else 408
        assert status_of(answer) == expected, (name, answer[:200])
        if expected:
            assert b"application/problem+json" in answer and b'"request_timeout"' in answer, name
        assert took >= cases[name][2] * 0.9, (name, took)


async def test_an_upload_abandoned_or_stalled_is_counted_as_the_clients_never_a_500(system: Any, api_key: str) -> None:
    def upload_counts(text: str) -> dict[str, float]:
        counts: dict[str, float] = {}
        for line in text.splitlines():
            series = line.startswith("http_server_request_duration_seconds_count{")
            if series and 'http_route="/v1/jobs"' in line and 'http_request_method="POST"' in line:
                status = re.search(r'http_response_status_code="(\d+)"', line)
                assert status is not None
                counts[status.group(1)] = counts.get(status.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
        return counts

    metrics_url = f"http://127.0.0.1:{system.ports.gateway_metrics}/metrics"
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{system.gateway_url}/metrics")).status_code == 404  # not on the API port
        before = upload_counts((await http.get(metrics_url)).text)
        head = (
            b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + api_key.encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 200000\r\n\r\n"
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + b"\0" * 50_000
        )
        _, writer = await asyncio.open_connection("127.0.0.1", system.ports.gateway)
        writer.write(head)
        await writer.drain()
        # The gateway is reading the body when the client gives up.
        writer.close()
        await writer.wait_closed()

        async def counted() -> dict[str, float]:
            while True:
                after = upload_counts((await http.get(metrics_url)).text)
                if after.get("499", 0) > before.get("499", 0):
                    return after
                await asyncio.sleep(0.2)  # polling a metric: there is no event to wait on

        after = await asyncio.wait_for(counted(), 30)
    assert after.get("500", 0) == before.get("500", 0), after
