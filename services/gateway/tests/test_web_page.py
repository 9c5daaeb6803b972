"""The web page the gateway serves at `/`: its files, its configuration, and the headers that lock it down."""

from __future__ import annotations

from typing import Any

import httpx


async def test_the_page_and_its_files_are_served_with_a_strict_policy(app: Any, client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert b"app.js" in page.content and b"app.css" in page.content
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy
    assert "connect-src 'self' ws://" in policy  # the notifier's WebSocket, and nothing else outside
    assert page.headers["x-content-type-options"] == "nosniff"
    assert (await client.get("/index.html")).content == page.content
    script = await client.get("/app.js")
    assert script.headers["content-type"].startswith("text/javascript") and b"WebSocket" in script.content
    assert (await client.get("/app.css")).headers["content-type"].startswith("text/css")
    # Compressed on the wire, and revalidated by ETag.
    zipped = await client.get("/app.js", headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert int(zipped.headers["content-length"]) < len(script.content) / 2  # httpx decoded .content
    assert zipped.content == script.content
    again = await client.get("/app.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


async def test_the_page_learns_the_notifier_address_from_config_json(app: Any, client: httpx.AsyncClient) -> None:
    config = await client.get("/config.json")
    assert config.json() == {"events_url": app.state.settings.events_url}


async def test_the_page_routes_are_not_part_of_the_api_document(app: Any, client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths and "/config.json" not in paths and "/v1/jobs" in paths


async def test_a_jobs_address_serves_the_page_with_its_files_named_from_the_root(
    app: Any, client: httpx.AsyncClient
) -> None:
    page = await client.get("/")
    job_page = await client.get("/jobs/0190a1b2c3d4e5f60718293a4b5c6d7e")
    assert job_page.status_code == 200 and job_page.content == page.content
    assert job_page.headers["content-security-policy"] == page.headers["content-security-policy"]
    # At /jobs/<id> a relative `app.js` would be /jobs/app.js: the page names its files from the root.
    assert b'src="/app.js"' in page.content and b'href="/app.css"' in page.content
    assert (await client.get("/jobs/not a job id!")).status_code == 404
    assert (await client.get("/jobs/a/b")).status_code == 404
    assert "/jobs/{job_id}" not in (await client.get("/openapi.json")).json()["paths"]
