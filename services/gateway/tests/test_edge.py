"""What the gateway shows the outside: headers, OPTIONS, offline docs, no /metrics on the API port, and a client
that leaves mid-upload counted as 499, not 500."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx

from gateway.http_metrics import MetricsPort
from stemflow_shared.httpserver import HttpLimits
from stemflow_shared.metrics import REGISTRY


async def test_every_answer_says_nosniff(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "edge-alice")
    for response in [
        await client.get("/healthz"),
        await client.get("/v1/jobs", headers=alice),
        await client.get("/v1/jobs/nope", headers=alice),
        await client.get("/v1/jobs"),
        await client.get("/openapi.json"),
    ]:
        assert response.headers["x-content-type-options"] == "nosniff", response.request.url


async def test_options_lists_every_method_of_each_path(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    for template, operations in schema["paths"].items():
        path = re.sub(r"\{[^}]+\}", "x1", template)
        answer = await client.options(path)
        assert answer.status_code == 204, path
        allowed = {m.strip() for m in answer.headers["allow"].split(",")}
        assert {method.upper() for method in operations} | {"OPTIONS"} <= allowed, (path, allowed)
    assert (await client.options("/no/such/path")).status_code == 404


async def test_a_405_lists_every_method_of_the_path(client: httpx.AsyncClient, helpers: Any) -> None:
    answer = await client.patch("/v1/jobs/x1")
    helpers.assert_problem(answer, 405, "method_not_allowed")
    assert {"GET", "DELETE", "OPTIONS"} <= {m.strip() for m in answer.headers["allow"].split(",")}


async def test_the_docs_load_nothing_from_elsewhere(client: httpx.AsyncClient) -> None:
    for page in ("/docs", "/redoc"):
        html = (await client.get(page)).text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", html)
        urls = [a or b for a, b in assets]
        assert urls, html
        for url in urls:
            assert url.startswith("/"), f"{page} loads {url}"
            answer = await client.get(url)
            assert answer.status_code == 200 and answer.content, url


async def test_the_api_port_does_not_serve_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/metrics")).status_code == 404


async def test_metrics_are_served_on_their_own_port_for_the_apps_lifetime() -> None:
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []
    started = asyncio.Event()

    async def lifespan_app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    async def capture(message: dict[str, Any]) -> None:
        sent.append(message)
        started.set()

    port_app = MetricsPort(lifespan_app, "127.0.0.1", 0, reuse_port=False, limits=HttpLimits())
    await events.put({"type": "lifespan.startup"})
    running = asyncio.create_task(port_app({"type": "lifespan"}, events.get, capture))
    await asyncio.wait_for(started.wait(), 10)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_app.bound_port}") as http:
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200 and "http_server_request_duration_seconds" in metrics.text
        missing = await http.get("/healthz")
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    await events.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(running, 10)
    assert sent[-1] == {"type": "lifespan.shutdown.complete"}


def requests_counted(status: str) -> float:
    labels = {"http_request_method": "POST", "http_route": "/v1/jobs", "http_response_status_code": status}
    return REGISTRY.get_sample_value("http_server_request_duration_seconds_count", labels) or 0.0


async def test_a_client_that_leaves_mid_upload_is_a_499_not_a_500(app: Any, helpers: Any) -> None:
    alice = await helpers.new_key(app, "edge-leaver")
    boundary = "leaving"
    first = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + helpers.wav_bytes()[:20_000]
    scope = helpers.upload_scope(
        [
            (b"authorization", alice["Authorization"].encode()),
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"content-length", b"1000000"),
        ]
    )
    messages = [{"type": "http.request", "body": first, "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        return None

    before_499, before_500 = requests_counted("499"), requests_counted("500")
    await app(scope, receive, send)
    assert requests_counted("499") == before_499 + 1
    assert requests_counted("500") == before_500
