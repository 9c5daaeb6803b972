"""The `stemflow` command, run as people and scripts run it, against the five running services."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

from stemflow_dev import demo_song
from stemflow_shared.auth import ApiKeys

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).with_name("stemflow")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "stemflow_cli"]
TERMINAL = {"stemflow.job.completed.v1", "stemflow.job.failed.v1", "stemflow.job.cancelled.v1"}


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def songs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-songs")
    audio = demo_song.render(8.0, bpm=120.0)
    sf.write(folder / "song.wav", audio, 44100, subtype="PCM_16")
    sf.write(folder / "short.flac", audio[: 4 * 44100], 44100)
    (folder / "noise.wav").write_bytes(b"plain text, not a song\n" * 200)
    return {path.stem: path for path in folder.iterdir()}


@pytest.fixture
def env(system: Any, api_key: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a user of this stack, with no config file of their own."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STEMFLOW_")}
    return {
        **clean,
        "STEMFLOW_URL": system.gateway_url,
        "STEMFLOW_API_KEY": api_key,
        "STEMFLOW_CONFIG": str(tmp_path / "config.toml"),
        "COLUMNS": "160",
        "NO_COLOR": "1",
    }


async def stemflow(*args: str | Path, env: dict[str, str], timeout: float = 300) -> Ran:
    process = await asyncio.create_subprocess_exec(
        *COMMAND, *map(str, args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def test_submit_follows_the_songs_downloads_stems_and_prints_the_analysis(
    env: dict[str, str], songs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "stems"
    ran = await stemflow(
        "submit", songs["song"], songs["short"], "--stems", "4", "--model", "htdemucs", "--quality", "fast",
        "--format", "flac", "--trim", "1:7", "--out", out, env=env,
    )  # fmt: skip
    assert ran.code == 0, ran.err
    for name, seconds in (("song", 6.0), ("short", 3.0)):
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == ["bass.flac", "drums.flac", "other.flac", "vocals.flac"]
        assert sf.info(out / name / "vocals.flac").duration == pytest.approx(seconds, abs=0.01)
    assert "Analysis of song.wav" in ran.out and "Analysis of short.flac" in ran.out
    assert "BPM  (confidence" in ran.out and "Key" in ran.out
    assert str(out / "song" / "drums.flac") in ran.out
    # The progress bars end showing every stage done (a terminal would have seen them move).
    assert ran.err.count("completed") >= 2 and "separation ✓" in ran.err
    assert not list(out.rglob("*.part"))


async def test_scripts_get_json_and_every_job_command_works(
    env: dict[str, str], songs: dict[str, Path], tmp_path: Path
) -> None:
    ran = await stemflow("submit", songs["short"], "--json", "--wait", "--stems", "2", "--quality", "fast", env=env)
    assert ran.code == 0, ran.err
    (job,) = ran.lines()
    job_id = job["id"]
    assert job["status"] == "completed" and len(job["result"]["stems"]) == 2
    stem_names = sorted(s["name"] for s in job["result"]["stems"])
    assert "vocals" in stem_names

    status = await stemflow("status", job_id, "--json", env=env)
    assert status.code == 0 and status.lines()[0]["progress"]["overall"] == 100.0
    human = await stemflow("status", job_id, env=env)
    assert human.code == 0 and "completed" in human.out and "Tempo" in human.out

    listed = await stemflow("list", "--json", "--limit", "100", env=env)
    assert job_id in {item["id"] for item in listed.lines()[0]["items"]}
    assert job_id in (await stemflow("list", "--status", "completed", env=env)).out

    zipped = await stemflow("download", job_id, "--zip", "--out", tmp_path, "--json", env=env)
    assert zipped.code == 0, zipped.err
    archive = zipped.lines()[0]["files"]["zip"]
    assert sorted(zipfile.ZipFile(archive).namelist()) == [f"{name}.wav" for name in stem_names]
    one = await stemflow("download", job_id, "--stem", "vocals", "--out", tmp_path / "one", env=env)
    assert one.code == 0 and sorted(p.name for p in (tmp_path / "one").iterdir()) == ["vocals.wav"]
    missing = await stemflow("download", job_id, "--stem", "kazoo", env=env)
    assert missing.code == 4 and "has no stem kazoo" in missing.err

    cancel = await stemflow("cancel", job_id, env=env)
    assert cancel.code == 5 and "nothing to cancel" in cancel.err

    deleted = await stemflow("delete", job_id, "--json", env=env)
    assert deleted.code == 0 and deleted.lines() == [{"id": job_id, "deleted": True}]
    gone = await stemflow("status", job_id, env=env)
    assert gone.code == 4 and f"no job {job_id}" in gone.err


async def test_one_upload_with_several_targets_downloads_each_targets_stems(
    env: dict[str, str], songs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "stems"
    # The running system serves htdemucs only: two stem sets of it are two targets.
    ran = await stemflow(
        "submit", songs["short"], "--target", "htdemucs:2", "--target", "htdemucs:4", "--quality", "fast",
        "--out", out, "--json", env=env,
    )  # fmt: skip
    assert ran.code == 0, ran.err
    (job,) = ran.lines()
    assert set(job["result"]["targets"]) == {"htdemucs-2", "htdemucs-4"}
    assert sorted(p.name for p in (out / "short" / "htdemucs-2").iterdir()) == ["accompaniment.wav", "vocals.wav"]
    four = sorted(p.name for p in (out / "short" / "htdemucs-4").iterdir())
    assert four == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
    assert set(job["files"]) == {
        *(f"htdemucs-2/{n}" for n in ("vocals", "accompaniment")),
        *(f"htdemucs-4/{n}" for n in ("bass", "drums", "other", "vocals")),
    }
    for path in (out / "short").rglob("*.wav"):
        assert sf.info(path).duration == pytest.approx(4.0, abs=0.01)

    one = await stemflow(
        "download", job["id"], "--target", "htdemucs-4", "--stem", "drums", "--out", tmp_path / "one", "--json", env=env
    )
    assert one.code == 0, one.err
    assert one.lines()[0]["files"] == {"htdemucs-4/drums": str(tmp_path / "one" / "htdemucs-4" / "drums.wav")}
    zipped = await stemflow("download", job["id"], "--target", "htdemucs-2", "--zip", "--out", tmp_path, env=env)
    assert zipped.code == 0, zipped.err
    archive = zipfile.ZipFile(tmp_path / f"{job['id']}-htdemucs-2-stems.zip")
    assert sorted(archive.namelist()) == ["accompaniment.wav", "vocals.wav"]
    unknown = await stemflow("download", job["id"], "--target", "htdemucs_6s-6", env=env)
    assert unknown.code == 4 and "has no target htdemucs_6s-6" in unknown.err
    bad = await stemflow("submit", songs["short"], "--target", "htdemucs:5", env=env)
    assert bad.code == 2 and "MODEL:STEMS" in bad.err


async def test_a_batch_is_one_request_with_one_id_and_every_job_followed(
    env: dict[str, str], songs: dict[str, Path], system: Any, api_key: str
) -> None:
    import httpx

    ran = await stemflow(
        "submit", songs["short"], songs["song"], "--batch", "--wait", "--json", "--stems", "2", "--quality", "fast",
        "--trim", "0:3", env=env,
    )  # fmt: skip
    assert ran.code == 0, ran.err
    jobs = ran.lines()
    assert [job["input"]["filename"] for job in jobs] == ["short.flac", "song.wav"]  # the songs' order
    assert all(job["status"] == "completed" and len(job["result"]["stems"]) == 2 for job in jobs)
    (batch_id,) = {job["batch_id"] for job in jobs}
    async with httpx.AsyncClient(base_url=system.gateway_url, headers={"Authorization": f"Bearer {api_key}"}) as http:
        batch = (await http.get(f"/v1/batches/{batch_id}")).json()
    assert batch["status"] == "completed" and sorted(j["id"] for j in batch["jobs"]) == sorted(j["id"] for j in jobs)

    mixed = await stemflow("submit", songs["short"], "https://example.com/a.mp3", "--batch", env=env)
    assert mixed.code == 2 and "all files or all URLs" in mixed.err
    refused = await stemflow("submit", songs["short"], songs["noise"], "--batch", "--wait", env=env)
    assert refused.code == 1  # the batch is accepted; the job of the text file fails, the other completes


async def test_watch_shows_every_job_of_the_key_live(
    env: dict[str, str], songs: dict[str, Path], mongo_db: Any, system: Any
) -> None:
    # A key of its own, so that no other test's job ends inside this watch. A new key has no job yet whose
    # `links.events` would tell where the notifier is, so it comes from the environment.
    env = {
        **env,
        "STEMFLOW_API_KEY": await ApiKeys(mongo_db).create("cli-watch"),
        "STEMFLOW_EVENTS_URL": system.events_url,
    }
    watch = await asyncio.create_subprocess_exec(
        *COMMAND, "watch", "--json", "--count", "1", "--timeout", "300",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        first = json.loads(await asyncio.wait_for(watch.stdout.readline(), 60))
        assert first == {"type": "subscribed", "job_id": None}
        submitted = await stemflow("submit", songs["short"], "--quality", "fast", "--json", env=env)
        assert submitted.code == 0, submitted.err
        job_id = submitted.lines()[0]["id"]
        rest, err = await asyncio.wait_for(watch.communicate(), 300)
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()
    assert watch.returncode == 0, err.decode()
    events = [json.loads(line) for line in rest.decode().splitlines()]
    assert {e["subject"] for e in events} == {job_id}
    assert events[-1]["type"] == "stemflow.job.completed.v1"
    assert "stemflow.job.progress.v1" in {e["type"] for e in events[:-1]}


async def test_problems_are_explained_with_their_exit_codes(
    env: dict[str, str], songs: dict[str, Path], system: Any
) -> None:
    refused = await stemflow("list", env={**env, "STEMFLOW_API_KEY": "sfk_not-a-key"})
    assert refused.code == 3 and "API key was refused" in refused.err and "STEMFLOW_API_KEY" in refused.err

    invalid = await stemflow("submit", songs["short"], "--trim", "90000:", env=env)  # beyond a day
    assert invalid.code == 6 and "refused the options: trim_start" in invalid.err

    as_json = await stemflow("submit", songs["short"], "--trim", ":90000", "--json", env=env)
    error = json.loads(as_json.err.strip().splitlines()[-1])["error"]
    assert as_json.code == 6 and error["problem"]["code"] == "validation_failed" and error["exit_code"] == 6

    failed = await stemflow("submit", songs["noise"], "--wait", env=env)
    assert failed.code == 1 and "failed: not_audio" in failed.err

    unknown = await stemflow("status", "0" * 32, env=env)
    assert unknown.code == 4 and "jobs of other API keys are invisible" in unknown.err

    # Waiting is bounded: the job goes on, the command says so and exits 9.
    slow = await stemflow("submit", songs["song"], "--wait", "--timeout", "0.01", env=env)
    assert slow.code == 9 and "still running after" in slow.err


async def test_configure_saves_the_settings_the_other_commands_use(
    env: dict[str, str], system: Any, api_key: str
) -> None:
    bare = {k: v for k, v in env.items() if k not in ("STEMFLOW_URL", "STEMFLOW_API_KEY")}
    saved = await stemflow(
        "configure", "--url", system.gateway_url, "--events-url", system.events_url, "--api-key", api_key, env=bare
    )
    assert saved.code == 0, saved.err
    assert Path(bare["STEMFLOW_CONFIG"]).stat().st_mode & 0o077 == 0
    listed = await stemflow("list", "--json", env=bare)
    assert listed.code == 0 and "items" in listed.lines()[0]


async def test_models_lists_what_is_served_and_submit_refuses_the_rest_before_uploading(
    env: dict[str, str], songs: dict[str, Path], mongo_db: Any
) -> None:
    # A key of its own: it must have no job at all once the refusals are done.
    env = {**env, "STEMFLOW_API_KEY": await ApiKeys(mongo_db).create("cli-models")}
    listed = await stemflow("models", "--json", env=env)
    assert listed.code == 0, listed.err
    (catalogue,) = listed.lines()
    models = {m["name"]: m for m in catalogue["models"]}
    assert set(models) == {"htdemucs", "htdemucs_ft", "htdemucs_6s"} and catalogue["default_model"] == "htdemucs"
    # The running system's separator serves htdemucs only.
    assert {name for name, m in models.items() if m["served"]} == {"htdemucs"}
    assert models["htdemucs"]["workers"] >= 1 and models["htdemucs_6s"]["stems"] == [2, 4, 6]
    table = await stemflow("models", env=env)
    assert table.code == 0, table.err
    row = next(line.split() for line in table.out.splitlines() if line.strip().startswith("htdemucs (default)"))
    assert row[2:5] == ["2,", "4", "yes"]
    assert next(line for line in table.out.splitlines() if line.strip().startswith("htdemucs_6s")).split()[4] == "no"

    for args, code, said in (
        (["--model", "htdemucs_ft"], 10, "no worker serves htdemucs_ft now"),
        (["--model", "htdemucs_6s", "--stems", "6"], 10, "no worker serves htdemucs_6s now"),
        (["--target", "htdemucs:4", "--target", "htdemucs_6s:6"], 10, "no worker serves htdemucs_6s (--target"),
        (["--stems", "6"], 6, "htdemucs (the default model) cannot give 6 stems"),
        (["--model", "htdemucs", "--stems", "6"], 6, "cannot give 6 stems: it gives 2 or 4 stems"),
        (["--target", "nonesuch:4"], 6, "there is no model nonesuch"),
    ):
        refused = await stemflow("submit", songs["short"], *args, env=env)
        assert refused.code == code and said in refused.err, (args, refused.err)
    six = await stemflow("submit", songs["short"], "--stems", "6", "--json", env=env)
    error = json.loads(six.err.strip().splitlines()[-1])["error"]
    assert six.code == 6 and error["exit_code"] == 6 and "htdemucs_6s" in error["hint"]
    unserved = await stemflow("submit", songs["short"], "--model", "htdemucs_ft", env=env)
    assert "served now: htdemucs" in unserved.err

    jobs = await stemflow("list", "--json", env=env)
    assert jobs.code == 0 and jobs.lines()[0]["items"] == []  # refused before any upload

    # An analysis-only job asks for no separation: no model to check.
    analysed = await stemflow("submit", songs["short"], "--no-separate", "--model", "htdemucs_6s", "--json", env=env)
    assert analysed.code == 0, analysed.err
