"""The web page the gateway serves at `/`: its files, its configuration, the headers that lock it down, and
its format choices in a real browser."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from stemflow_shared.storage import stem_key


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


# --- in a real browser (Debian's Chromium through Playwright) against this gateway, served over HTTP ---

ROOT = Path(__file__).resolve().parents[3]
ARTIFACTS = ROOT / "test-artifacts" / "web"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@contextlib.asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """The app on a free local port (its lifespan already runs), for a browser to open."""
    listening = socket.create_server(("127.0.0.1", 0))  # bound first: connections wait in its backlog
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[listening]))
    try:
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def page_with_key(base: str, key: str, path: str = "/") -> AsyncIterator[Any]:
    playwright_api = pytest.importorskip("playwright.async_api", reason="Python package `playwright` is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's Chromium is missing: apt-get install -y chromium")
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        try:
            page = await (await browser.new_context(viewport={"width": 1100, "height": 1400})).new_page()
            await page.goto(base + "/")
            await page.evaluate("key => localStorage.setItem('stemflow.apiKey', key)", key)
            await page.goto(base + path)
            yield page
        finally:
            await browser.close()


async def test_the_page_offers_bit_depth_and_sample_rate_for_stems_and_mixes(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    owner = await helpers.new_key(app, f"formats-{uuid.uuid4().hex[:6]}")
    key = owner["Authorization"].removeprefix("Bearer ")
    song = Path(tempfile.mkdtemp()) / "Song.wav"
    song.write_bytes(helpers.wav_bytes(1.0))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with served(app) as base, page_with_key(base, key) as page:
        depth, rate, fmt = page.locator("#opt-depth"), page.locator("#opt-rate"), page.locator("#opt-format")
        # MP3 has neither; FLAC has no float; WAV has all.
        await fmt.select_option("mp3")
        assert await depth.is_disabled() and await rate.is_disabled()
        await fmt.select_option("flac")
        assert await depth.is_enabled() and await rate.is_enabled()
        assert await page.locator("#opt-depth option[value=float]").is_disabled()
        await depth.select_option("24")
        await rate.select_option("48000")
        await page.screenshot(path=ARTIFACTS / "12-formats.png", full_page=True)
        await page.locator("#file").set_input_files(song)
        async with page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST") as sent:
            await page.get_by_role("button", name="Split the song").click()
        job = await (await sent.value).json()
        options = (await client.get(f"/v1/jobs/{job['id']}", headers=owner)).json()["options"]
        assert options["output_format"] == "flac" and options["bit_depth"] == 24 and options["sample_rate"] == 48000
        # Remembered for the next song, after a reload too.
        await page.reload()
        assert await depth.input_value() == "24" and await rate.input_value() == "48000"

    # A finished job's practice mix is exported at the bit depth chosen (its rate is the stems').
    job_id = await helpers.completed_job(app, client, owner, fingerprint=uuid.uuid4().hex)
    for name in ("vocals", "accompaniment"):
        await app.state.jobs.blobs.put_stream(stem_key(job_id, name, "wav"), _once(helpers.wav_bytes(2.0)))
    async with served(app) as base, page_with_key(base, key, f"/jobs/{job_id}") as page:
        await page.locator("#player[data-state=ready]").wait_for(timeout=60_000)
        mix_depth = page.locator("#mix-depth")
        await page.locator("#mix-format").select_option("mp3")
        assert await mix_depth.is_hidden()
        await page.locator("#mix-format").select_option("flac")
        assert await mix_depth.is_visible() and await page.locator("#mix-depth option[value='32']").is_disabled()
        await mix_depth.select_option("16")
        async with page.expect_request(lambda r: r.url.endswith("/mixes") and r.method == "POST") as posted:
            await page.get_by_role("button", name="Export this mix").click()
        assert (await posted.value).post_data_json == {"format": "flac", "bit_depth": 16}
        await page.locator("#mixes li", has_text="FLAC 16-bit").wait_for(timeout=10_000)
        await page.screenshot(path=ARTIFACTS / "13-mix-formats.png", full_page=True)
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.screenshot(path=ARTIFACTS / "14-formats-phone.png", full_page=True)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    (mix,) = (await client.get(f"/v1/jobs/{job_id}/mixes", headers=owner)).json()["items"]
    assert mix["options"] == {"format": "flac", "bit_depth": 16}


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
