"""The web page in a real browser (Debian's Chromium through Playwright) against the running services.

The gateway serves the page at `/` and at each job's address `/jobs/<id>` (with `/config.json` naming
the notifier); the page talks to the API on the same origin and to the notifier's WebSocket, the API
key sent as a subprotocol, exactly as in production. Screenshots are kept under test-artifacts/web.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import shutil
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import soundfile as sf

from stemflow_dev import demo_song
from stemflow_dev.client import StemflowClient

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
async def signed_in_page(
    browser: Any, system: Any, api_key: str, height: int = 1200, path: str = "/"
) -> AsyncIterator[Any]:
    """The page, open at the gateway (at `path`) with the API key already kept in the browser."""
    context = await browser.new_context(viewport={"width": 1100, "height": height}, accept_downloads=True)
    page = await context.new_page()
    try:
        await page.goto(system.gateway_url + "/")
        await page.evaluate("key => localStorage.setItem('stemflow.apiKey', key)", api_key)
        await page.goto(system.gateway_url + path)
        yield page
    finally:
        await context.close()


@pytest_asyncio.fixture(scope="module")
async def finished_job(system: Any, api_key: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A completed four-stem job of a six-second demo song, analysed (beats, chords), for the player tests.

    A song of its own (another seed): one that other tests send too would have its results reused.
    """
    song = tmp_path_factory.mktemp("practice") / "groove.wav"
    sf.write(song, demo_song.render(6.0, bpm=120.0, seed=11), 44100, subtype="PCM_16")
    client = StemflowClient(system.gateway_url, system.events_url, api_key)
    try:
        job = await client.submit(song, stems=4, quality="fast", output_format="wav")
        await client.follow(job["id"], timeout_s=300)
        done = await client.job(job["id"])
    finally:
        await client.aclose()
    assert done["status"] == "completed", done
    return done


def watch_problems(page: Any) -> list[str]:
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda m: problems.append(f"console: {m.text} {m.location}") if m.type == "error" else None)
    return problems


async def position(page: Any) -> float:
    return float(await page.locator("#wave").get_attribute("data-position") or 0)


def test_the_initial_load_is_under_100_kb_gzipped() -> None:
    sizes = {name: len(gzip.compress((STATIC / name).read_bytes(), 9)) for name in ("index.html", "app.js", "app.css")}
    assert sum(sizes.values()) < 100 * 1024, sizes


async def test_upload_progress_mixer_and_downloads_in_a_real_browser(
    system: Any, api_key: str, browser: Any, song: Path
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = await browser.new_context(viewport={"width": 1100, "height": 1400}, accept_downloads=True)
    page = await context.new_page()
    problems = watch_problems(page)
    try:
        await page.goto(system.gateway_url + "/")

        # The key form says where a key comes from; with no key saved there is nothing to forget or go back to.
        assert "Ask whoever runs this Stemflow" in await page.locator("#key-help").inner_text()
        assert not await page.get_by_role("button", name="Forget the key").is_visible()
        assert not await page.get_by_role("button", name="Keep the current key").is_visible()
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
        # The job has its own address, and the options chosen stay chosen for the next song.
        job_id = await page.locator("#jobs li.job").first.get_attribute("data-id")
        assert page.url == f"{system.gateway_url}/jobs/{job_id}"
        assert await page.get_by_label("Quality").input_value() == "fast"
        assert await page.get_by_label("Format").input_value() == "wav"
        await page.screenshot(path=ARTIFACTS / "2-submitted.png", full_page=True)
        await page.locator("#job-section[data-status=completed]").wait_for(timeout=300_000)
        seen = await page.evaluate("window.seen")
        assert seen[-1] == "completed"
        assert {"ingesting", "processing"} & {line.split(" · ")[0] for line in seen}, seen  # " · 0 ahead …"
        assert await page.locator("#p-overall").get_attribute("value") == "100"
        # Finished: the results, not four full progress bars.
        assert await page.locator("#stages").is_hidden()

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

        # Each stem has its own waveform.
        for stem in ("vocals", "drums", "bass", "other"):
            assert await painted_share(page, f".stem[data-stem={stem}] canvas") > 0.01, stem

        # The mixer: solo, mute, volume, then synchronised playback and seeking from the keyboard.
        gains = lambda: rows.evaluate_all("rows => Object.fromEntries(rows.map(r => [r.dataset.stem, r.dataset.gain]))")  # noqa: E731

        async def silent() -> list[str]:
            return await rows.evaluate_all(
                "rs => rs.filter(r => r.classList.contains('silent')).map(r => r.dataset.stem).sort()"
            )

        await page.get_by_role("button", name="Solo vocals").click()
        assert await gains() == {"vocals": "1.00", "drums": "0.00", "bass": "0.00", "other": "0.00"}
        assert await page.get_by_role("button", name="Solo vocals").get_attribute("aria-pressed") == "true"
        # Soloing dims the others, visibly.
        assert await silent() == ["bass", "drums", "other"]
        opacity = "e => getComputedStyle(e).opacity"
        assert float(await page.locator(".stem[data-stem=drums] .stem-name").evaluate(opacity)) < 0.5
        assert float(await page.locator(".stem[data-stem=vocals] .stem-name").evaluate(opacity)) == 1
        await page.get_by_role("button", name="Solo vocals").click()
        await page.get_by_role("button", name="Mute drums").click()
        assert await silent() == ["drums"]
        # Slider values are shown, from 0 to 150%, with 100% marked.
        bass = page.get_by_label("bass volume")
        assert (await bass.get_attribute("min"), await bass.get_attribute("max")) == ("0", "150")
        assert await page.locator(".stem[data-stem=bass] output").inner_text() == "100%"
        assert await bass.evaluate("s => [...s.list.options].map(o => o.value)") == ["100"]
        await bass.fill("50")
        assert await page.locator(".stem[data-stem=bass] output").inner_text() == "50%"
        assert await gains() == {"vocals": "1.00", "drums": "0.00", "bass": "0.50", "other": "1.00"}
        await page.get_by_role("button", name="Play").click()
        await page.locator("#player[data-state=playing]").wait_for()
        await page.wait_for_function("() => Number(document.getElementById('wave').getAttribute('aria-valuenow')) >= 1")
        await page.screenshot(path=ARTIFACTS / "3-mixer-playing.png", full_page=True)
        await page.get_by_role("button", name="Pause").click()
        await page.locator("#player[data-state=paused]").wait_for()
        assert await position(page) > 0
        # Stop after Pause goes back to the start: the time and the playhead say so.
        await page.get_by_role("button", name="Stop").click()
        assert await position(page) == 0
        assert (await page.locator("#time").inner_text()).startswith("0:00 /")
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

        # The library: the song's title, duration, stems and model, listed as completed.
        row = page.locator(f"#jobs li[data-id='{job_id}']")
        assert await row.locator(".s-completed").inner_text() == "completed"
        assert await row.locator("button.open").inner_text() == "groove"
        assert "0:06 · 4 stems · htdemucs" in await row.locator(".meta").inner_text()

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

        # The options chosen are still there on the next visit.
        await page.goto(system.gateway_url + "/")
        await page.locator("body[data-live=on]").wait_for()
        assert await page.get_by_label("Quality").input_value() == "fast"
        assert await page.get_by_label("Format").input_value() == "wav"
    finally:
        await context.close()


async def painted_share(page: Any, selector: str) -> float:
    """The share of a canvas's pixels that are painted."""
    return float(
        await page.locator(selector).evaluate(
            """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                      let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n / (c.width * c.height); }"""
        )
    )


async def test_a_pasted_url_that_fails_shows_why_and_the_job_can_be_deleted(
    system: Any, api_key: str, browser: Any
) -> None:
    async with signed_in_page(browser, system, api_key) as page:
        await page.get_by_label("…or paste a URL").fill("http://127.0.0.1:9/song.mp3")
        await page.get_by_role("button", name="Split the song").click()
        await page.locator("#job-section[data-status=failed]").wait_for(timeout=120_000)
        # Why, in words; and a failed job does not claim to be 100% done.
        await page.locator("#job-status").filter(has_text="Stemflow may not fetch that address").wait_for()
        assert await page.locator("#job-status").get_attribute("data-code") == "url_forbidden"
        assert await page.locator("#p-overall-text").inner_text() == "failed"
        assert await page.locator("#p-overall").is_hidden()
        await page.locator("body[data-live=on]").wait_for()
        await page.screenshot(path=ARTIFACTS / "5-failed-url.png", full_page=True)

        job_id = await page.locator("#jobs li.job").first.get_attribute("data-id")
        row = page.locator(f"#jobs li[data-id='{job_id}']")
        assert (await row.locator(".state").inner_text()).startswith("failed: Stemflow may not fetch that address")
        page.once("dialog", lambda dialog: dialog.accept())
        await row.get_by_role("button", name="Delete song").click()
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
        # A long stem name stays clear of its slider, on a desktop and on a phone.
        for width in (1100, 390):
            await page.set_viewport_size({"width": width, "height": 1400})
            name = await page.locator(".stem[data-stem=accompaniment] .stem-name").bounding_box()
            slider = await page.locator(".stem[data-stem=accompaniment] .vol").bounding_box()
            apart = name["x"] + name["width"] <= slider["x"] or name["y"] + name["height"] <= slider["y"]
            assert apart, (width, name, slider)
            if width == 390:
                await page.screenshot(path=ARTIFACTS / "6-targets-phone.png", full_page=True)
        await page.set_viewport_size({"width": 1100, "height": 1400})

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
        # Grouped as one batch, in the files' order, and the first one opened.
        batch = page.locator("#jobs li.batch").first
        assert (await batch.locator(".batch-head").inner_text()).startswith("Batch of 2 songs · ")
        listed = await batch.locator("li.job button.open").evaluate_all("bs => bs.map(b => b.textContent)")
        assert listed == ["track-1", "track-2"]
        ids = await batch.locator("li.job").evaluate_all("lis => lis.map(li => li.dataset.id)")
        assert await page.locator("#job-title").inner_text() == "track-1"
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
                                                   document.querySelector('#jobs li.job .state')?.textContent || '']);
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


async def test_a_jobs_address_opens_it_after_a_reload_for_whoever_has_the_key_and_back_and_forward_work(
    system: Any, api_key: str, browser: Any, finished_job: dict[str, Any]
) -> None:
    job_id = finished_job["id"]
    address = f"{system.gateway_url}/jobs/{job_id}"
    context = await browser.new_context(viewport={"width": 1100, "height": 1200})
    page = await context.new_page()
    problems = watch_problems(page)
    try:
        # Shared with someone who has the key: the address asks for it, then opens the song.
        await page.goto(address)
        await page.get_by_label("API key", exact=True).fill(api_key)
        await page.get_by_role("button", name="Save key").click()
        await page.locator("#player[data-state=ready]").wait_for(timeout=120_000)
        assert await page.locator("#job-title").inner_text() == "groove"
        assert await page.title() == "groove \u2013 Stemflow"
        # A reload keeps the song open.
        await page.reload()
        await page.locator("#player[data-state=ready]").wait_for(timeout=120_000)
        assert page.url == address and await page.locator("#job-title").inner_text() == "groove"
        # Back to the library, then back and forward through the history.
        await page.get_by_role("button", name="Back to the library").click()
        assert page.url == system.gateway_url + "/"
        assert await page.locator("#job-section").is_hidden()
        await page.go_back()
        await page.locator("#player[data-state=ready]").wait_for(timeout=120_000)
        assert page.url == address
        await page.go_forward()
        await page.locator("#job-section").wait_for(state="hidden")
        assert page.url == system.gateway_url + "/"
        await page.go_back()
        await page.locator("#job-section:not([hidden])").wait_for()

        # Run again with another model: an upload from another visit asks for its file again, options kept.
        await page.get_by_role("button", name="Run again with another model").click()
        dialog = page.get_by_role("dialog", name="Run this song again")
        assert "choose the file again" in await dialog.inner_text()
        await dialog.get_by_label("Stem count").select_option("2")
        await dialog.get_by_role("button", name="Run again").click()
        await page.locator("#file-name").filter(has_text="Choose groove.wav again").wait_for()
        assert await page.locator("#opt-stems").input_value() == "2"
        assert await page.evaluate("document.activeElement.id") == "file"

        # An address that names no job of this key says so, and leads back to the library.
        await page.goto(f"{system.gateway_url}/jobs/{'0' * 32}")
        await page.get_by_role("alert").filter(has_text="No song of this API key has that address").wait_for()
        assert page.url == system.gateway_url + "/"
        problems = [p for p in problems if "404" not in p]  # the browser logs the refused read
        assert problems == []
    finally:
        await context.close()


async def test_practice_loop_a_dragged_section_with_the_click_and_export_the_mix(
    system: Any, api_key: str, browser: Any, finished_job: dict[str, Any], tmp_path: Path
) -> None:
    job_id = finished_job["id"]
    async with signed_in_page(browser, system, api_key, height=1500, path=f"/jobs/{job_id}") as page:
        problems = watch_problems(page)
        await page.locator("#player[data-state=ready]").wait_for(timeout=120_000)
        # The chords under the waveform, as the analysis has them.
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}) as http:
            analysis = (await http.get(f"{system.gateway_url}/v1/jobs/{job_id}/analysis")).json()
        chords = [c for c in analysis.get("chords") or [] if c.get("root")]
        if chords:
            await page.wait_for_function(f"() => document.querySelectorAll('#chords .chord').length === {len(chords)}")
            assert await page.locator("#chords .chord").first.inner_text() == chords[0]["label"]

        # Drag from 1 s to 2.5 s on the six-second waveform: that is the section.
        box = await page.locator("#wave").bounding_box()
        x_at = lambda seconds: box["x"] + box["width"] * seconds / 6.0  # noqa: E731
        middle = box["y"] + box["height"] / 2
        await page.mouse.move(x_at(1.0), middle)
        await page.mouse.down()
        await page.mouse.move(x_at(2.5), middle, steps=8)
        await page.mouse.up()
        start = float(await page.get_by_label("From (s)").input_value())
        end = float(await page.get_by_label("to (s)").input_value())
        assert abs(start - 1.0) < 0.1 and abs(end - 2.5) < 0.1, (start, end)
        # Looped, the playhead comes back to the section's start and never leaves it.
        await page.get_by_label("Loop the section").check()
        await page.get_by_label("Click on the beats").check()
        await page.get_by_role("button", name="Play").click()
        # Until the player has started, the waveform shows where it was before (the section is not a seek).
        await page.locator("#player[data-state=playing]").wait_for(timeout=30_000)
        await page.wait_for_function(
            """([start, end]) => {
                 const p = Number(document.getElementById('wave').dataset.position);
                 window.inside = (window.inside ?? true) && p >= start - 0.05 && p <= end + 0.3;  // one time update of overshoot before the page wraps
                 const wrapped = window.last !== undefined && p < window.last;
                 window.last = p;
                 return wrapped || !window.inside;
               }""",
            arg=[start, end],
            polling=50,
            timeout=30_000,
        )
        assert await page.evaluate("window.inside")
        await page.get_by_role("button", name="Pause").click()

        # The practice panel: tempo and pitch shown as set, then the mix exported through the API.
        await page.get_by_role("slider", name="Tempo").fill("75")
        await page.get_by_role("slider", name="Pitch").fill("-2")
        assert await page.locator("#tempo-out").inner_text() == "75%"
        assert await page.locator("#pitch-out").inner_text() == "\u22122 semitones"
        await page.get_by_label("Times in the export").fill("2")
        await page.get_by_role("button", name="Mute drums").click()
        await page.screenshot(path=ARTIFACTS / "8-practice.png", full_page=True)
        await page.get_by_role("button", name="Export this mix").click()
        mix = page.locator("#mixes li").first
        await mix.wait_for()
        assert "tempo 75% · \u22122 semitones" in await mix.inner_text()
        await page.locator("#mixes li[data-status=completed], #mixes li[data-status=failed]").wait_for(timeout=300_000)
        assert await mix.get_attribute("data-status") == "completed", await mix.inner_text()
        await mix.locator("audio").wait_for()
        await page.locator("#announcer").filter(has_text="The mix is ready").wait_for()
        async with page.expect_download() as mix_download:
            await mix.get_by_role("button", name="Download the mix", exact=False).click()
        saved = tmp_path / "mix.wav"
        await (await mix_download.value).save_as(saved)
        # Two times the 1.5 s section at three-quarter speed.
        assert abs(sf.info(saved).duration - 2 * (end - start) / 0.75) < 0.15, sf.info(saved).duration
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}) as http:
            (listed,) = [
                m
                for m in (await http.get(f"{system.gateway_url}/v1/jobs/{job_id}/mixes")).json()["items"]
                if m["id"] == await mix.get_attribute("data-mix")
            ]
        assert listed["options"]["tempo"] == 0.75 and listed["options"]["semitones"] == -2
        assert listed["options"]["click"] is True and listed["options"]["loops"] == 2
        assert listed["options"]["mute"] == ["drums"]
        assert (listed["options"]["start"], listed["options"]["end"]) == (start, end)
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.screenshot(path=ARTIFACTS / "9-practice-phone.png", full_page=True)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        assert problems == []


async def test_the_library_searches_filters_groups_runs_again_and_deletes_in_bulk_keeping_focus(
    system: Any, api_key: str, browser: Any
) -> None:
    tag = f"lib{uuid.uuid4().hex[:6]}"
    url = lambda name: f"http://127.0.0.1:9/{tag}-{name}.mp3"  # noqa: E731  refused by the fetcher: fails fast
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}) as http:

        async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            response = await http.post(system.gateway_url + path, json=body)
            assert response.status_code == 202, response.text
            return response.json()

        alpha = await post("/v1/jobs", {"source_url": url("alpha")})
        batch = await post("/v1/batches", {"source_urls": [url("one"), url("two")], "stems": 2})
        async with signed_in_page(browser, system, api_key, height=1400) as page:
            problems = watch_problems(page)
            await page.locator("body[data-live=on]").wait_for()
            rows = page.locator("#jobs li.job")
            await page.get_by_label("Search").fill(tag)
            for job in [alpha, *batch["jobs"]]:
                await page.locator(f"#jobs li[data-id='{job['id']}'][data-status=failed]").wait_for(timeout=120_000)
            # Titles, what was asked for, and why it failed in words.
            alpha_row = page.locator(f"#jobs li[data-id='{alpha['id']}']")
            assert await alpha_row.locator("button.open").inner_text() == f"{tag}-alpha"
            assert "4 stems · htdemucs" in await alpha_row.locator(".meta").inner_text()
            assert (await alpha_row.locator(".state").inner_text()).startswith("failed: Stemflow may not fetch")
            # The batch's songs together, in the order sent.
            group = page.locator(f"#jobs li.batch[data-batch='{batch['id']}']")
            assert await group.locator("li.job button.open").evaluate_all("bs => bs.map(b => b.textContent)") == [
                f"{tag}-one",
                f"{tag}-two",
            ]
            assert "2 stems" in await group.locator("li.job .meta").first.inner_text()

            # Focus stays where it is while live updates arrive (rows are updated in place, not rebuilt);
            # the new song is announced politely.
            await alpha_row.locator(".remove").focus()
            await alpha_row.evaluate("li => { li.kept = true; }")
            beta = await post("/v1/jobs", {"source_url": url("beta")})
            await page.locator(f"#jobs li[data-id='{beta['id']}'][data-status=failed]").wait_for(timeout=120_000)
            assert await page.evaluate("document.activeElement.getAttribute('aria-label')") == f"Delete {tag}-alpha"
            assert await alpha_row.evaluate("li => li.kept === true")
            assert await page.locator("#announcer").get_attribute("aria-live") == "polite"
            assert f"{tag}-beta" in await page.locator("#announcer").inner_text()

            # Search and filter.
            await page.get_by_label("Search").fill(f"{tag}-alpha")
            assert await rows.evaluate_all("rs => rs.filter(r => !r.hidden).map(r => r.dataset.id)") == [alpha["id"]]
            await page.get_by_label("Search").fill(tag)
            await page.locator("#filter").select_option("completed")
            assert await page.locator("#jobs-empty").inner_text() == "No song matches the search."
            await page.locator("#filter").select_option("failed")
            shown = await rows.evaluate_all("rs => rs.filter(r => !r.hidden).map(r => r.dataset.id)")
            assert sorted(shown) == sorted([alpha["id"], beta["id"], *[j["id"] for j in batch["jobs"]]])

            # Run again with another model: the URL is sent again with the model and stems chosen.
            await alpha_row.get_by_role("button", name=f"Run {tag}-alpha again").click()
            dialog = page.get_by_role("dialog", name="Run this song again")
            await dialog.get_by_label("Stem count").select_option("2")
            await dialog.get_by_role("button", name="Run again").click()
            await page.wait_for_function(
                f"() => [...document.querySelectorAll('#jobs li.job')].filter(li => li.textContent.includes('{tag}-alpha')).length === 2"
            )
            again_id = await page.locator("#jobs li.job").first.get_attribute("data-id")
            again = (await http.get(f"{system.gateway_url}/v1/jobs/{again_id}")).json()
            assert again["input"]["source_url"] == url("alpha") and again["options"]["stems"] == 2
            await page.locator(f"#jobs li[data-id='{again_id}'][data-status=failed]").wait_for(timeout=120_000)
            await page.locator("#filter").select_option("")
            await page.screenshot(path=ARTIFACTS / "10-library.png", full_page=True)
            await page.set_viewport_size({"width": 390, "height": 844})
            await page.screenshot(path=ARTIFACTS / "11-library-phone.png", full_page=True)
            assert await page.evaluate("document.documentElement.scrollWidth") <= 390
            await page.set_viewport_size({"width": 1100, "height": 1400})

            # Bulk delete of every song shown.
            await page.get_by_label("Select all shown").check()
            ids = [alpha["id"], beta["id"], again_id, *[j["id"] for j in batch["jobs"]]]
            assert await page.get_by_role("button", name="Delete selected (5)").is_enabled()
            page.once("dialog", lambda d: d.accept())
            await page.get_by_role("button", name="Delete selected (5)").click()
            for job_id in ids:
                await page.locator(f"#jobs li[data-id='{job_id}']").wait_for(state="detached")
            await page.locator("#announcer").filter(has_text="Deleted 5 songs").wait_for()
            for job_id in ids:
                assert (await http.get(f"{system.gateway_url}/v1/jobs/{job_id}")).status_code == 404
            assert problems == []


async def test_the_key_can_be_changed_backed_out_of_and_a_wrong_one_keeps_the_old(
    system: Any, api_key: str, browser: Any
) -> None:
    async with signed_in_page(browser, system, api_key) as page:
        await page.locator("body[data-live=on]").wait_for()
        await page.get_by_role("button", name="Change API key").click()
        assert await page.get_by_role("button", name="Forget the key").is_visible()
        await page.get_by_role("button", name="Keep the current key").click()
        assert await page.locator("#key-section").is_hidden()
        assert await page.get_by_role("button", name="Change API key").is_visible()
        # A mistyped key is refused and the one in use stays.
        await page.get_by_role("button", name="Change API key").click()
        await page.get_by_label("API key", exact=True).fill("sfk_mistyped")
        await page.get_by_role("button", name="Save key").click()
        await page.get_by_role("alert").filter(has_text="API key was refused").wait_for()
        assert await page.evaluate("localStorage.getItem('stemflow.apiKey')") == api_key
        await page.get_by_role("button", name="Keep the current key").click()
        assert await page.locator("#key-section").is_hidden()
        # The WebSocket carries the key as a subprotocol, not in its URL.
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        await page.reload()
        await page.locator("body[data-live=on]").wait_for()
        assert sockets and all("token=" not in address and api_key not in address for address in sockets), sockets


async def test_refusals_say_what_to_fix_not_which_field(system: Any, api_key: str, browser: Any) -> None:
    async with signed_in_page(browser, system, api_key) as page:
        await page.locator("body[data-live=on]").wait_for()
        submit = page.get_by_role("button", name="Split the song")
        alert = page.get_by_role("alert")
        # Refused by the page itself, before anything is sent.
        await page.get_by_label("…or paste a URL").fill("ftp://example.com/song.mp3")
        await submit.click()
        await alert.filter(has_text="Please check the URL").wait_for()
        await page.get_by_label("…or paste a URL").fill("https://example.com/song.mp3")
        await page.get_by_label("Start (s)").fill("20")
        await page.get_by_label("End (s)").fill("10")
        await submit.click()
        await alert.filter(has_text="End: it must come after Start").wait_for()
        # Refused by the service: a URL with a password.
        await page.get_by_label("Start (s)").fill("")
        await page.get_by_label("End (s)").fill("")
        await page.get_by_label("…or paste a URL").fill("https://me:secret@example.com/song.mp3")
        await submit.click()
        await alert.filter(has_text="without a user name or password").wait_for()
        text = await alert.inner_text()
        assert "Please check the URL" in text and "source_url" not in text, text
