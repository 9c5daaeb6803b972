"""The web page in a real browser (Debian's Chromium through Playwright) against the running services.

The gateway serves the page at `/` (with `/config.json` naming the notifier); the page talks to
the API on the same origin and to the notifier's WebSocket, exactly as in production.
Screenshots are kept under test-artifacts/web.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import shutil
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import soundfile as sf

from stemflow_dev import demo_song

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "services" / "gateway" / "src" / "gateway" / "static"
ARTIFACTS = ROOT / "test-artifacts" / "web"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def song(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("web") / "groove.wav"
    sf.write(path, demo_song.render(6.0, bpm=120.0), 44100, subtype="PCM_16")
    return path


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Any]:
    playwright_api = pytest.importorskip("playwright.async_api", reason="Python package `playwright` is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's Chromium is missing: apt-get install -y chromium chromium-driver")
    async with playwright_api.async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@contextlib.asynccontextmanager
async def signed_in_page(browser: Any, system: Any, api_key: str, height: int = 1200) -> AsyncIterator[Any]:
    """The page, open at the gateway with the API key already kept in the browser."""
    context = await browser.new_context(viewport={"width": 1100, "height": height}, accept_downloads=True)
    page = await context.new_page()
    try:
        await page.goto(system.gateway_url + "/")
        await page.evaluate("key => localStorage.setItem('stemflow.apiKey', key)", api_key)
        await page.reload()
        yield page
    finally:
        await context.close()


def test_the_initial_load_is_under_100_kb_gzipped() -> None:
    sizes = {name: len(gzip.compress((STATIC / name).read_bytes(), 9)) for name in ("index.html", "app.js", "app.css")}
    assert sum(sizes.values()) < 100 * 1024, sizes


async def test_upload_progress_mixer_and_downloads_in_a_real_browser(
    system: Any, api_key: str, browser: Any, song: Path
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = await browser.new_context(viewport={"width": 1100, "height": 1400}, accept_downloads=True)
    page = await context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda m: problems.append(f"console: {m.text} {m.location}") if m.type == "error" else None)
    try:
        await page.goto(system.gateway_url + "/")

        # The key: a wrong one is refused with a clear message, the right one is kept in the browser.
        await page.get_by_label("API key", exact=True).fill("sfk_wrong")
        await page.get_by_role("button", name="Save key").click()
        await page.get_by_role("alert").filter(has_text="API key was refused").wait_for()
        problems.clear()  # the 401 of the wrong key is logged by the browser; nothing after it may be
        await page.get_by_label("API key", exact=True).fill(api_key)
        await page.get_by_role("button", name="Save key").click()
        await page.locator("body[data-live=on]").wait_for()
        assert await page.evaluate("localStorage.getItem('stemflow.apiKey')") == api_key
        await page.screenshot(path=ARTIFACTS / "1-ready.png", full_page=True)

        # Record every status the page shows, to see that progress arrived live, step by step.
        await page.evaluate(
            """() => {
              window.seen = [];
              const line = document.getElementById('job-status');
              new MutationObserver(() => window.seen.push(line.textContent)).observe(line, {childList: true, characterData: true, subtree: true});
            }"""
        )
        await page.set_input_files("#file", song)
        await page.get_by_label("Stems").select_option("4")
        await page.get_by_label("Quality").select_option("fast")
        await page.get_by_label("Format").select_option("wav")
        await page.get_by_role("button", name="Split the song").click()
        await page.locator("#job-section:not([hidden])").wait_for()
        await page.screenshot(path=ARTIFACTS / "2-submitted.png", full_page=True)
        await page.locator("#job-section[data-status=completed]").wait_for(timeout=300_000)
        seen = await page.evaluate("window.seen")
        assert seen[-1] == "completed"
        assert {"ingesting", "processing"} & {line.split(" · ")[0] for line in seen}, seen  # " · 0 ahead …"
        assert await page.locator("#p-overall").get_attribute("value") == "100"

        # Results: tempo and key with confidence, the waveform, one mixer row per stem once decoded.
        await page.locator("#player[data-state=ready]").wait_for(timeout=120_000)
        assert abs(float(await page.locator("#bpm").inner_text()) - 120.0) < 5
        assert (await page.locator("#key").inner_text()).endswith(("major", "minor"))
        assert "confidence" in await page.locator("#bpm-conf").inner_text()
        # The doubt the analysis states: the runner-up key, e.g. "A minor · or C major".
        await page.locator("#key-conf").filter(has_text=" · or ").wait_for(timeout=30_000)
        rows = page.locator(".stem")
        assert not await page.locator("#target-pick").is_visible()  # one separation: nothing to pick
        assert sorted(await rows.evaluate_all("rows => rows.map(r => r.dataset.stem)")) == [
            "bass",
            "drums",
            "other",
            "vocals",
        ]
        painted = await page.evaluate(
            """() => { const c = document.getElementById('wave');
                       const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                       let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n / (c.width * c.height); }"""
        )
        assert painted > 0.05

        # The mixer: solo, mute, volume, then synchronised playback and seeking from the keyboard.
        gains = lambda: rows.evaluate_all("rows => Object.fromEntries(rows.map(r => [r.dataset.stem, r.dataset.gain]))")  # noqa: E731
        await page.get_by_role("button", name="Solo vocals").click()
        assert await gains() == {"vocals": "1.00", "drums": "0.00", "bass": "0.00", "other": "0.00"}
        assert await page.get_by_role("button", name="Solo vocals").get_attribute("aria-pressed") == "true"
        await page.get_by_role("button", name="Solo vocals").click()
        await page.get_by_role("button", name="Mute drums").click()
        await page.get_by_label("bass volume").fill("50")
        assert await gains() == {"vocals": "1.00", "drums": "0.00", "bass": "0.50", "other": "1.00"}
        await page.get_by_role("button", name="Play").click()
        await page.locator("#player[data-state=playing]").wait_for()
        await page.wait_for_function("() => Number(document.getElementById('wave').getAttribute('aria-valuenow')) >= 1")
        await page.screenshot(path=ARTIFACTS / "3-mixer-playing.png", full_page=True)
        await page.get_by_role("button", name="Pause").click()
        await page.locator("#player[data-state=paused]").wait_for()
        await page.locator("#wave").focus()
        await page.keyboard.press("Home")
        assert await page.locator("#wave").get_attribute("aria-valuenow") == "0"
        await page.keyboard.press("ArrowRight")
        assert await page.locator("#wave").get_attribute("aria-valuenow") == "5"

        # Downloads go through fetch with the key, then a blob URL.
        async with page.expect_download() as stem_download:
            await page.get_by_role("button", name="Download vocals").click()
        vocals = await stem_download.value
        assert vocals.suggested_filename == "vocals.wav"
        await vocals.save_as(ARTIFACTS / "vocals.wav")
        assert sf.info(ARTIFACTS / "vocals.wav").frames == 6 * 44100
        async with page.expect_download() as zip_download:
            await page.get_by_role("button", name="Download all stems (zip)").click()
        archive = await zip_download.value
        data = Path(await archive.path()).read_bytes()
        assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == [
            "bass.wav",
            "drums.wav",
            "other.wav",
            "vocals.wav",
        ]

        # My jobs: the job is listed as completed.
        job_id = await page.evaluate("document.querySelector('#jobs li').dataset.id")
        assert await page.locator(f"#jobs li[data-id='{job_id}'] .s-completed").inner_text() == "completed"

        # Accessibility basics: every control has a name.
        unnamed = await page.evaluate(
            """() => [...document.querySelectorAll('input, select, button, [role=slider]')]
                 .filter(e => e.offsetParent !== null)
                 .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
                 .map(e => e.outerHTML)"""
        )
        assert unnamed == []
        assert problems == []

        # On a phone.
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.screenshot(path=ARTIFACTS / "4-phone.png", full_page=True)
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390
    finally:
        await context.close()


async def test_a_pasted_url_that_fails_shows_why_and_the_job_can_be_deleted(
    system: Any, api_key: str, browser: Any
) -> None:
    async with signed_in_page(browser, system, api_key) as page:
        await page.get_by_label("…or paste a URL").fill("http://127.0.0.1:9/song.mp3")
        await page.get_by_role("button", name="Split the song").click()
        await page.locator("#job-section[data-status=failed]").wait_for(timeout=120_000)
        await page.locator("#job-status").filter(has_text="[url_forbidden]").wait_for()
        await page.locator("body[data-live=on]").wait_for()
        await page.screenshot(path=ARTIFACTS / "5-failed-url.png", full_page=True)

        job_id = await page.evaluate("document.querySelector('#jobs li').dataset.id")
        page.once("dialog", lambda dialog: dialog.accept())
        await page.get_by_role("button", name="Delete http://127.0.0.1:9/song.mp3").first.click()
        await page.locator(f"#jobs li[data-id='{job_id}']").wait_for(state="detached")
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}) as http:
            assert (await http.get(f"{system.gateway_url}/v1/jobs/{job_id}")).status_code == 404


async def test_a_job_with_several_targets_plays_and_zips_the_chosen_one(
    system: Any, api_key: str, browser: Any, client: Any, tmp_path: Path
) -> None:
    song = tmp_path / "two-targets.wav"
    sf.write(song, demo_song.render(4.0, bpm=100.0), 44100, subtype="PCM_16")
    # The running system serves htdemucs only: two stem sets of it are two targets.
    job = await client.submit(song, targets="htdemucs:2,htdemucs:4", quality="fast", output_format="wav")
    await client.follow(job["id"], timeout_s=300)
    problems: list[str] = []
    async with signed_in_page(browser, system, api_key, height=1400) as page:
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        await page.locator(f"#jobs li[data-id='{job['id']}'] button.open").click()
        await page.locator("#player[data-state=ready]").wait_for(timeout=120_000)
        rows = page.locator(".stem")
        stems = "rows => rows.map(r => r.dataset.stem).sort()"
        # The primary target first, and a picker of both.
        assert await rows.evaluate_all(stems) == ["accompaniment", "vocals"]
        assert await page.locator("#target-pick").is_visible()
        picker = page.get_by_label("Target", exact=True)
        assert await picker.evaluate("s => [...s.options].map(o => o.value)") == ["htdemucs-2", "htdemucs-4"]
        assert await picker.input_value() == "htdemucs-2"

        await picker.select_option("htdemucs-4")
        await page.locator("#player[data-state=ready]").wait_for(timeout=120_000)
        await page.wait_for_function("() => document.querySelectorAll('.stem').length === 4")
        assert await rows.evaluate_all(stems) == ["bass", "drums", "other", "vocals"]
        await page.screenshot(path=ARTIFACTS / "6-targets.png", full_page=True)

        async with page.expect_download() as stem_download:
            await page.get_by_role("button", name="Download drums").click()
        drums = await stem_download.value
        await drums.save_as(tmp_path / "drums.wav")
        assert sf.info(tmp_path / "drums.wav").frames == 4 * 44100
        async with page.expect_download() as zip_download:
            await page.get_by_role("button", name="Download all stems (zip)").click()
        archive = await zip_download.value
        assert archive.suggested_filename == f"{job['id']}-htdemucs-4-stems.zip"
        names = zipfile.ZipFile(io.BytesIO(Path(await archive.path()).read_bytes())).namelist()
        assert sorted(names) == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
        assert problems == []


async def test_several_files_make_one_batch_listed_in_order(
    system: Any, api_key: str, browser: Any, tmp_path: Path
) -> None:
    songs = []
    for index, bpm in enumerate((90.0, 110.0)):
        path = tmp_path / f"track-{index + 1}.wav"
        sf.write(path, demo_song.render(3.0, bpm=bpm), 44100, subtype="PCM_16")
        songs.append(path)
    async with signed_in_page(browser, system, api_key) as page:
        await page.set_input_files("#file", songs)
        await page.locator("#file-name").filter(has_text="Selected 2 songs (one batch)").wait_for()
        await page.get_by_label("Stems").select_option("2")
        await page.get_by_label("Quality").select_option("fast")
        await page.get_by_role("button", name="Split the song").click()
        await page.locator("#job-section:not([hidden])").wait_for()
        # Both jobs listed, the first file on top, and the first one opened.
        listed = await page.locator("#jobs li button.open").evaluate_all("bs => bs.slice(0, 2).map(b => b.textContent)")
        assert listed == ["track-1.wav", "track-2.wav"]
        ids = await page.locator("#jobs li").evaluate_all("lis => lis.slice(0, 2).map(li => li.dataset.id)")
        assert await page.locator("#job-title").inner_text() == "track-1.wav"
        for job_id in ids:
            await page.locator(f"#jobs li[data-id='{job_id}'] .s-completed").wait_for(timeout=300_000)
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}) as http:
            jobs = [(await http.get(f"{system.gateway_url}/v1/jobs/{job_id}")).json() for job_id in ids]
            (batch_id,) = {job["batch_id"] for job in jobs}
            assert batch_id is not None
            batch = (await http.get(f"{system.gateway_url}/v1/batches/{batch_id}")).json()
        assert batch["status"] == "completed" and sorted(j["id"] for j in batch["jobs"]) == sorted(ids)


async def options_of(page: Any, select: str) -> list[dict[str, Any]]:
    return await page.locator(select).evaluate(
        "s => [...s.options].map(o => ({value: o.value, text: o.textContent, disabled: o.disabled}))"
    )


async def served_models(system: Any, api_key: str) -> dict[str, Any]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}) as http:
        response = await http.get(f"{system.gateway_url}/v1/models")
    assert response.status_code == 200, response.text
    return response.json()


async def test_the_choices_are_the_models_served_and_their_stem_counts(system: Any, api_key: str, browser: Any) -> None:
    catalogue = await served_models(system, api_key)
    served = {m["name"] for m in catalogue["models"] if m["served"]}
    assert served == {"htdemucs"}  # the running system's separator serves htdemucs only
    async with signed_in_page(browser, system, api_key) as page:
        await page.wait_for_function(
            f"() => document.getElementById('opt-model').options.length === {len(catalogue['models'])}"
        )
        models = await options_of(page, "#opt-model")
        assert [m["value"] for m in models] == [m["name"] for m in catalogue["models"]]
        for option in models:
            assert option["disabled"] == (option["value"] not in served)
            assert ("no worker serves this model now" in option["text"]) == option["disabled"]
        assert await page.get_by_label("Model").input_value() == "htdemucs"
        assert [o["value"] for o in await options_of(page, "#opt-stems")] == ["2", "4"]
        assert await page.get_by_label("Stems").input_value() == "4"
        assert not await page.locator("#models-notice").is_visible()
        await page.screenshot(path=ARTIFACTS / "7-models.png", full_page=True)


async def test_the_stems_follow_the_model_chosen(system: Any, api_key: str, browser: Any) -> None:
    catalogue = await served_models(system, api_key)
    # As a stack whose pools serve every model would answer (this one serves htdemucs only).
    every = {**catalogue, "models": [{**m, "served": True, "workers": 1} for m in catalogue["models"]]}
    async with signed_in_page(browser, system, api_key) as page:
        await page.route("**/v1/models", lambda route: route.fulfill(json=every))
        await page.reload()
        await page.wait_for_function(
            f"() => [...document.getElementById('opt-model').options].filter(o => !o.disabled).length === {len(every['models'])}"
        )
        await page.get_by_label("Model").select_option("htdemucs_6s")
        assert [o["value"] for o in await options_of(page, "#opt-stems")] == ["2", "4", "6"]
        await page.get_by_label("Stems").select_option("6")
        assert "guitar" in await page.locator("#model-help").inner_text()
        await page.get_by_label("Model").select_option("htdemucs_ft")
        assert [o["value"] for o in await options_of(page, "#opt-stems")] == ["2", "4"]
        assert await page.get_by_label("Stems").input_value() == "4"  # six is not on offer: the default count


async def test_without_the_list_of_models_the_page_offers_the_default_and_says_so(
    system: Any, api_key: str, browser: Any
) -> None:
    async with signed_in_page(browser, system, api_key) as page:
        await page.route("**/v1/models", lambda route: route.fulfill(status=503, json={"code": "unavailable"}))
        await page.reload()
        await page.locator("#models-notice").filter(has_text="could not be read").wait_for()
        assert [o["value"] for o in await options_of(page, "#opt-model")] == ["htdemucs"]
        assert [o["value"] for o in await options_of(page, "#opt-stems")] == ["2", "4"]
        assert await page.get_by_role("button", name="Split the song").is_enabled()


async def test_a_model_that_stopped_being_served_is_refused_and_the_list_read_again(
    system: Any, api_key: str, browser: Any, song: Path
) -> None:
    catalogue = await served_models(system, api_key)
    stale = {**catalogue, "models": [{**m, "served": True} for m in catalogue["models"]]}
    async with signed_in_page(browser, system, api_key) as page:
        # The list the page read said htdemucs_ft was served; by the time the song is sent, no worker serves it.
        await page.route("**/v1/models", lambda route: route.fulfill(json=stale))
        await page.reload()
        await page.wait_for_function(
            f"() => [...document.getElementById('opt-model').options].filter(o => !o.disabled).length === {len(stale['models'])}"
        )
        await page.unroute("**/v1/models")
        await page.set_input_files("#file", song)
        await page.get_by_label("Model").select_option("htdemucs_ft")
        await page.get_by_role("button", name="Split the song").click()
        await page.get_by_role("alert").filter(has_text="choose one that is served").wait_for()
        await page.wait_for_function("() => document.querySelector('#opt-model option[value=htdemucs_ft]').disabled")
        assert await page.get_by_label("Model").input_value() == "htdemucs"
        assert await page.locator("#job-section").is_hidden()


async def test_a_waiting_job_shows_its_place_and_estimated_start(system: Any, api_key: str, browser: Any) -> None:
    async with signed_in_page(browser, system, api_key) as page:
        # The job as answered while two jobs are ahead of it (this stack is rarely that busy when the test runs).
        # A pasted URL, so that the request is JSON that the route can pass on as it is.
        async def ahead(route: Any) -> None:
            if route.request.method != "POST":
                return await route.continue_()
            response = await route.fetch()
            job = await response.json()
            await route.fulfill(status=response.status, json={**job, "queue": {"ahead": 2, "estimated_start_s": 40.0}})

        await page.route("**/v1/jobs", ahead)
        # What the status line and the job's list entry show, each time they change (the next read of the job
        # from the server, as the WebSocket subscription starts, replaces the answer above within moments).
        await page.evaluate(
            """() => {
              window.seen = [];
              const note = () => window.seen.push([document.getElementById('job-status').textContent,
                                                   document.querySelector('#jobs li small')?.textContent || '']);
              for (const id of ['job-status', 'jobs'])
                new MutationObserver(note).observe(document.getElementById(id), {childList: true, characterData: true, subtree: true});
            }"""
        )
        await page.get_by_label("…or paste a URL").fill("http://127.0.0.1:9/waiting.mp3")
        await page.get_by_role("button", name="Split the song").click()
        # This URL is refused by the service's fetcher: the job ends, and with it the wait.
        await page.locator("#job-section[data-status=failed]").wait_for(timeout=120_000)
        seen = await page.evaluate("window.seen")
        assert "queued · 2 ahead · starts in ~40 s" in {line for line, _ in seen}, seen
        assert any(entry.endswith(" · 2 ahead · starts in ~40 s") for _, entry in seen), seen
        assert "ahead" not in await page.locator("#job-status").inner_text()
