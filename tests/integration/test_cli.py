"""The `stemflow` command, run as people and scripts run it, against the five running services."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf
from rich.filesize import decimal

from stemflow_dev import demo_song
from stemflow_shared.auth import ApiKeys

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).with_name("stemflow")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "stemflow_cli"]
TERMINAL = {"stemflow.job.completed.v1", "stemflow.job.failed.v1", "stemflow.job.cancelled.v1"}
DASH = "\u2013"  # stems are saved as the service names them: 'song \u2013 Vocals.flac'


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]

    def final(self) -> list[dict[str, Any]]:
        """The last document of each job (--json says each job's document when it is made, then when it ends)."""
        last: dict[str, dict[str, Any]] = {}
        for line in self.lines():
            last[line["id"]] = line
        return list(last.values())


@pytest.fixture(scope="module")
def songs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-songs")
    audio = demo_song.render(8.0, bpm=120.0)
    sf.write(folder / "song.wav", audio, 44100, subtype="PCM_16")
    sf.write(folder / "short.flac", audio[: 4 * 44100], 44100)
    (folder / "noise.wav").write_bytes(b"plain text, not a song\n" * 200)
    # Not text, so it passes the CLI's look and is refused by the service (not_audio).
    (folder / "garbage.wav").write_bytes(bytes(range(1, 256)) * 64)
    sf.write(folder / "float.wav", audio[: 3 * 44100], 44100, subtype="FLOAT")
    sf.write(
        folder / "A Very Long Song Title That Would Never Fit In A Column (Extended Mix).flac", audio[:44100], 44100
    )
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
        assert files == [f"{name} {DASH} {stem}.flac" for stem in ("Bass", "Drums", "Other", "Vocals")]
        assert sf.info(out / name / f"{name} {DASH} Vocals.flac").duration == pytest.approx(seconds, abs=0.01)
    assert "Analysis of song.wav" in ran.out and "Analysis of short.flac" in ran.out
    assert "BPM  (confidence" in ran.out and "Key" in ran.out
    assert str(out / "song" / f"song {DASH} Drums.flac") in ran.out
    # The progress bars end showing every stage done (a terminal would have seen them move).
    assert ran.err.count("completed") >= 2 and "separation ✓" in ran.err
    assert not list(out.rglob("*.part"))


async def test_scripts_get_json_and_every_job_command_works(
    env: dict[str, str], songs: dict[str, Path], tmp_path: Path
) -> None:
    ran = await stemflow("submit", songs["short"], "--json", "--wait", "--stems", "2", "--quality", "fast", env=env)
    assert ran.code == 0, ran.err
    submitted, job = ran.lines()  # its document as soon as it exists, then as it ended
    job_id = job["id"]
    assert submitted["id"] == job_id and submitted["status"] in ("queued", "ingesting")
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
    assert archive == str(tmp_path / "short (stems).zip")
    assert sorted(zipfile.ZipFile(archive).namelist()) == [f"{name}.flac" for name in stem_names]
    one = await stemflow("download", job_id, "--stem", "vocals", "--out", tmp_path / "one", env=env)
    assert one.code == 0 and sorted(p.name for p in (tmp_path / "one").iterdir()) == [f"short {DASH} Vocals.flac"]
    missing = await stemflow("download", job_id, "--stem", "kazoo", env=env)
    assert missing.code == 4 and "has no stem kazoo" in missing.err

    cancel = await stemflow("cancel", job_id, env=env)
    assert cancel.code == 5 and "nothing to cancel" in cancel.err

    deleted = await stemflow("delete", job_id, "--json", env=env)
    assert deleted.code == 0 and deleted.lines() == [{"id": job_id, "deleted": True, "name": "short.flac"}]
    gone = await stemflow("status", job_id, env=env)
    assert gone.code == 4 and f"no job {job_id}" in gone.err


async def test_one_upload_with_several_targets_downloads_each_targets_stems(
    env: dict[str, str], songs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "stems"
    # The running system serves htdemucs only: two stem sets of it are two targets.
    ran = await stemflow(
        "submit", songs["short"], "--target", "htdemucs:2", "--target", "htdemucs:4", "--quality", "fast",
        "--out", out, "--json", "--format", "wav", env=env,
    )  # fmt: skip
    assert ran.code == 0, ran.err
    (job,) = ran.final()
    assert set(job["result"]["targets"]) == {"htdemucs-2", "htdemucs-4"}
    two = sorted(p.name for p in (out / "short" / "htdemucs-2").iterdir())
    assert two == [f"short {DASH} {stem} (htdemucs-2).wav" for stem in ("Accompaniment", "Vocals")]
    four = sorted(p.name for p in (out / "short" / "htdemucs-4").iterdir())
    assert four == [f"short {DASH} {stem} (htdemucs-4).wav" for stem in ("Bass", "Drums", "Other", "Vocals")]
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
    drums = tmp_path / "one" / "htdemucs-4" / f"short {DASH} Drums (htdemucs-4).wav"
    assert one.lines()[0]["files"] == {"htdemucs-4/drums": str(drums)}
    zipped = await stemflow("download", job["id"], "--target", "htdemucs-2", "--zip", "--out", tmp_path, env=env)
    assert zipped.code == 0, zipped.err
    archive = zipfile.ZipFile(tmp_path / "short (stems, htdemucs-2).zip")
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
    jobs = ran.final()
    assert [job["input"]["filename"] for job in jobs] == ["short.flac", "song.wav"]  # the songs' order
    assert all(job["status"] == "completed" and len(job["result"]["stems"]) == 2 for job in jobs)
    (batch_id,) = {job["batch_id"] for job in jobs}
    async with httpx.AsyncClient(base_url=system.gateway_url, headers={"Authorization": f"Bearer {api_key}"}) as http:
        batch = (await http.get(f"/v1/batches/{batch_id}")).json()
    assert batch["status"] == "completed" and sorted(j["id"] for j in batch["jobs"]) == sorted(j["id"] for j in jobs)

    mixed = await stemflow("submit", songs["short"], "https://example.com/a.mp3", "--batch", env=env)
    assert mixed.code == 2 and "all files or all URLs" in mixed.err
    refused = await stemflow("submit", songs["short"], songs["garbage"], "--batch", "--wait", env=env)
    assert refused.code == 1  # the batch is accepted; the job of the file that is no audio fails, the other completes


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

    failed = await stemflow("submit", songs["garbage"], "--wait", env=env)
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
        (["--stems", "6"], 10, "no worker serves htdemucs_6s now"),  # six stems alone: the six-source model
        (["--model", "htdemucs", "--stems", "6"], 6, "cannot give 6 stems: it gives 2 or 4 stems"),
        (["--target", "nonesuch:4"], 6, "there is no model nonesuch"),
    ):
        refused = await stemflow("submit", songs["short"], *args, env=env)
        assert refused.code == code and said in refused.err, (args, refused.err)
    six = await stemflow("submit", songs["short"], "--stems", "6", env=env)
    assert "6 stems: using the model htdemucs_6s" in six.err and "served now: htdemucs" in six.err
    text = await stemflow("submit", songs["noise"], env=env)
    said = " ".join(text.err.split())
    assert text.code == 6 and "This file type is not accepted (noise.wav holds text, not audio). Send WAV" in said
    unserved = await stemflow("submit", songs["short"], "--model", "htdemucs_ft", env=env)
    assert "served now: htdemucs" in unserved.err

    jobs = await stemflow("list", "--json", env=env)
    assert jobs.code == 0 and jobs.lines()[0]["items"] == []  # refused before any upload

    # An analysis-only job asks for no separation: no model to check.
    analysed = await stemflow("submit", songs["short"], "--no-separate", "--model", "htdemucs_6s", "--json", env=env)
    assert analysed.code == 0, analysed.err


async def test_the_job_id_is_always_said_and_ctrl_c_names_it_again(
    env: dict[str, str], songs: dict[str, Path], system: Any
) -> None:
    quiet = await stemflow("submit", songs["short"], "-q", "--stems", "2", "--quality", "fast", "--no-analyze", env=env)
    assert quiet.code == 0, quiet.err
    job_id = next(word for word in quiet.err.split() if len(word) == 32)
    assert f"as job {job_id}" in quiet.err
    waited = await stemflow("submit", songs["short"], "-q", "--wait", "--stems", "2", "--quality", "fast", env=env)
    assert waited.code == 0 and "as job " in waited.err

    # Ctrl-C while following: the job goes on, and the command says which it was.
    follow = await asyncio.create_subprocess_exec(
        *COMMAND, "submit", songs["song"], "--wait", "--quality", "fast", "--no-analyze",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert follow.stderr is not None
    said = b""
    while b"as job" not in said:
        said += await asyncio.wait_for(follow.stderr.readline(), 60)
    follow.send_signal(signal.SIGINT)
    _, rest = await asyncio.wait_for(follow.communicate(), 60)
    interrupted_id = said.split(b"as job", 1)[1].split()[0].decode()
    assert follow.returncode == 130
    assert f"{interrupted_id} (song.wav) go on on the server" in " ".join(rest.decode().split())

    # `watch` is stopped with Ctrl-C, as its help says: that is success.
    watch_env = {**env, "STEMFLOW_EVENTS_URL": system.events_url}
    watch = await asyncio.create_subprocess_exec(
        *COMMAND, "watch", "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=watch_env
    )
    assert watch.stdout is not None
    assert json.loads(await asyncio.wait_for(watch.stdout.readline(), 60))["type"] == "subscribed"
    watch.send_signal(signal.SIGINT)
    await asyncio.wait_for(watch.communicate(), 60)
    assert watch.returncode == 0


async def test_list_piped_keeps_names_whole_says_why_and_delete_names_the_songs(
    env: dict[str, str], songs: dict[str, Path], mongo_db: Any
) -> None:
    env = {**env, "STEMFLOW_API_KEY": await ApiKeys(mongo_db).create("cli-list"), "COLUMNS": "80"}
    long_song = next(path for name, path in songs.items() if name.startswith("A Very Long"))
    made = await stemflow("submit", long_song, "--no-separate", "--json", "--wait", env=env)
    assert made.code == 0, made.err
    broken = await stemflow("submit", songs["garbage"], "--wait", "--json", env=env)
    assert broken.code == 1
    listed = await stemflow("list", env=env)  # a pipe, 80 columns: nothing is cut
    assert listed.code == 0, listed.err
    assert long_song.name in listed.out
    failed_row = next(line for line in listed.out.splitlines() if "garbage.wav" in line)
    assert "failed" in failed_row and "not_audio:" in failed_row

    ids = [made.final()[0]["id"], broken.final()[0]["id"]]
    deleted = await stemflow("delete", *ids, env=env)
    assert deleted.code == 0, deleted.err
    assert f"deleted job {ids[0]} ({long_song.name})" in deleted.out and "(garbage.wav)" in deleted.out
    again = await stemflow("delete", ids[0], env=env)
    assert again.code == 4 and "nothing was deleted" in again.err


async def test_stems_are_24_bit_unless_the_song_is_16_and_depth_and_rate_can_be_chosen(
    env: dict[str, str], songs: dict[str, Path], tmp_path: Path
) -> None:
    common = ("--stems", "2", "--quality", "fast", "--no-analyze", "--format", "wav")
    floating = await stemflow("submit", songs["float"], *common, "--out", tmp_path / "a", env=env)
    assert floating.code == 0, floating.err
    vocals = tmp_path / "a" / "float" / f"float {DASH} Vocals.wav"
    assert sf.info(vocals).subtype == "PCM_24"  # a float source no longer gives float WAV
    sixteen = await stemflow("submit", songs["short"], *common, "--out", tmp_path / "b", env=env)
    assert sixteen.code == 0 and sf.info(tmp_path / "b" / "short" / f"short {DASH} Vocals.wav").subtype == "PCM_16"
    chosen = await stemflow(
        "submit", songs["short"], *common, "--bit-depth", "float", "--sample-rate", "48000", "--out", tmp_path / "c",
        env=env,
    )  # fmt: skip
    assert chosen.code == 0, chosen.err
    path = tmp_path / "c" / "short" / f"short {DASH} Vocals.wav"
    info = sf.info(path)
    assert (info.subtype, info.samplerate) == ("FLOAT", 48000) and info.duration == pytest.approx(4.0, abs=0.01)
    # The closing table lists the file written, its size as the download bar counted it.
    row = next(line for line in chosen.out.splitlines() if str(path) in line or path.name in line)
    assert decimal(path.stat().st_size) in row
    refused = await stemflow("submit", songs["short"], "--format", "mp3", "--bit-depth", "24", env=env)
    assert refused.code == 6 and "bit_depth" in refused.err
