"""The command line: arguments, job options, exit codes of problems found before any request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stemflow_cli.main import _options, build_parser, run


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(list(argv))


def test_only_the_options_given_are_sent_so_the_server_defaults_apply() -> None:
    args = parse("submit", "a.wav", "--stems", "2", "--format", "wav", "--trim", "10:95", "--no-analyze")
    assert _options(args) == {
        "stems": 2,
        "output_format": "wav",
        "trim_start": 10.0,
        "trim_end": 95.0,
        "analyze": False,
    }
    # But the format: the web page's default (FLAC), so that both give the same files.
    assert _options(parse("submit", "a.wav")) == {"output_format": "flac"}
    assert _options(parse("submit", "a.wav", "--no-separate")) == {"separate": False}


def test_bit_depth_and_sample_rate_are_sent_as_the_service_names_them(capsys: pytest.CaptureFixture[str]) -> None:
    options = _options(parse("submit", "a.wav", "--bit-depth", "float", "--sample-rate", "48000", "--format", "wav"))
    assert options == {"output_format": "wav", "bit_depth": 32, "sample_rate": 48000}
    assert _options(parse("submit", "a.wav", "--bit-depth", "16"))["bit_depth"] == 16
    for bad in (("--bit-depth", "8"), ("--sample-rate", "22050")):
        with pytest.raises(SystemExit) as raised:
            parse("submit", "a.wav", *bad)
        assert raised.value.code == 2 and bad[0] in capsys.readouterr().err


def test_a_text_file_is_refused_before_upload_with_the_pages_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    environ = {
        "STEMFLOW_CONFIG": str(tmp_path / "none.toml"),
        "STEMFLOW_API_KEY": "k",
        "STEMFLOW_URL": "http://127.0.0.1:9",
    }
    notes = tmp_path / "notes.txt"
    notes.write_text("not a song\n")
    assert run(["submit", str(notes)], environ) == 6
    said = " ".join(capsys.readouterr().err.split())
    assert "This file type is not accepted (notes.txt: a .txt file is not audio). Send WAV, FLAC" in said
    fake = tmp_path / "fake.mp3"
    fake.write_text("plain text, not a song\n" * 200)
    assert run(["submit", str(fake)], environ) == 6  # refused before the (unreachable) gateway is asked
    assert "fake.mp3 holds text, not audio" in " ".join(capsys.readouterr().err.split())


def test_ctrl_c_names_the_jobs_submitted_and_watch_stops_with_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from stemflow_cli import commands

    environ = {"STEMFLOW_CONFIG": str(tmp_path / "none.toml"), "STEMFLOW_API_KEY": "k"}
    song = tmp_path / "song.wav"
    song.write_bytes(b"RIFF" + bytes(100))

    async def interrupted_submit(ctx: commands.Context, *args: object, **kwargs: object) -> int:
        ctx.submitted.append(("job-1", "song.wav"))
        raise KeyboardInterrupt

    async def interrupted_watch(ctx: commands.Context, **kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "submit", interrupted_submit)
    monkeypatch.setattr(commands, "watch", interrupted_watch)
    assert run(["submit", str(song)], environ) == 130
    assert "job(s) job-1 (song.wav) go on on the server" in " ".join(capsys.readouterr().err.split())
    assert run(["submit", str(song), "--json"], environ) == 130
    assert "job-1" in json.loads(capsys.readouterr().err)["error"]["message"]
    assert run(["watch"], environ) == 0
    assert "stopped watching" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "start", "end"), [("10:95", 10.0, 95.0), ("10:", 10.0, None), (":9.5", None, 9.5)])
def test_trim_takes_either_side(text: str, start: float | None, end: float | None) -> None:
    options = _options(parse("submit", "a.wav", "--trim", text))
    assert (options.get("trim_start"), options.get("trim_end")) == (start, end)


@pytest.mark.parametrize("text", ["95:10", "10", ":", "a:b", "-1:5"])
def test_a_bad_trim_is_a_usage_error(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse("submit", "a.wav", "--trim", text)
    assert raised.value.code == 2
    assert "--trim" in capsys.readouterr().err


def test_connection_flags_work_before_or_after_the_command() -> None:
    before = parse("--url", "http://a:1", "--json", "status", "J")
    after = parse("status", "J", "--url", "http://a:1", "--json")
    assert before.url == after.url == "http://a:1" and before.json and after.json


def test_out_implies_wait_and_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"STEMFLOW_CONFIG": str(tmp_path / "none.toml")}
    assert run(["status", "J"], environ) == 2
    assert "no API key is configured" in capsys.readouterr().err
    assert run(["submit", str(tmp_path / "missing.wav"), "--api-key", "k"], environ) == 2
    assert "no such file" in capsys.readouterr().err


def test_an_unreachable_gateway_exits_8_and_says_where(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"STEMFLOW_CONFIG": str(tmp_path / "none.toml"), "STEMFLOW_API_KEY": "k"}
    assert run(["--json", "list", "--url", "http://127.0.0.1:9"], environ) == 8
    err = capsys.readouterr().err
    assert '"exit_code": 8' in err and "127.0.0.1:9" in err


def test_targets_are_sent_as_one_form_field_and_checked_first(capsys: pytest.CaptureFixture[str]) -> None:
    from stemflow_cli.api import _form_value

    options = _options(parse("submit", "a.wav", "--target", "htdemucs:4", "--target", "htdemucs_6s:6"))
    assert options == {"targets": ["htdemucs:4", "htdemucs_6s:6"], "output_format": "flac"}
    assert _form_value(options["targets"]) == "htdemucs:4,htdemucs_6s:6"
    for bad in ("htdemucs:5", ":4", "htdemucs"):
        with pytest.raises(SystemExit) as raised:
            parse("submit", "a.wav", "--target", bad)
        assert raised.value.code == 2
        assert "MODEL:STEMS" in capsys.readouterr().err
    # Model names are not fixed in the command: `/v1/models` says which exist, before any upload.
    assert _options(parse("submit", "a.wav", "--target", "htdemucs_next:4", "--model", "htdemucs_next")) == {
        "model": "htdemucs_next",
        "targets": ["htdemucs_next:4"],
        "output_format": "flac",
    }
