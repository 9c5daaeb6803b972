"""`stemflow practice` (and its alias `mix`): the options sent, and usage errors before any request."""

from __future__ import annotations

from pathlib import Path

import pytest

from stemflow_cli.main import build_parser, run
from stemflow_cli.practice import destination, mix_options


def options(*argv: str) -> dict[str, object]:
    return mix_options(build_parser().parse_args(["practice", "JOB", *argv]))


def test_only_the_options_given_are_sent() -> None:
    assert options() == {}
    sent = options(
        "--preset", "karaoke", "--mute", "drums", "--gain", "bass=1.5", "--tempo", "0.75", "--semitones", "-2",
        "--cents", "15", "--section", "30:45", "--loops", "4", "--click", "--format", "flac", "--bit-depth", "16",
    )  # fmt: skip
    assert sent == {
        "preset": "karaoke",
        "mute": ["drums"],
        "gains": {"bass": 1.5},
        "tempo": 0.75,
        "semitones": -2,
        "cents": 15.0,
        "start": 30.0,
        "end": 45.0,
        "loops": 4,
        "click": True,
        "format": "flac",
        "bit_depth": 16,
    }
    assert options("--section", "30:") == {"start": 30.0}


def test_mix_is_the_same_command() -> None:
    args = build_parser().parse_args(["mix", "JOB", "--solo", "vocals", "--solo", "bass", "--no-wait"])
    assert mix_options(args) == {"solo": ["vocals", "bass"]} and args.wait is False


@pytest.mark.parametrize(
    ("flag", "value"), [("--gain", "bass"), ("--gain", "bass=5"), ("--section", "45:30"), ("--section", ":")]
)
def test_bad_values_are_usage_errors(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(["practice", "JOB", flag, value])
    assert raised.value.code == 2
    assert flag in capsys.readouterr().err


def test_an_unreachable_gateway_exits_8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"STEMFLOW_CONFIG": str(tmp_path / "none.toml"), "STEMFLOW_API_KEY": "k"}
    assert run(["practice", "JOB", "--tempo", "0.8", "--url", "http://127.0.0.1:9"], environ) == 8
    assert "127.0.0.1:9" in capsys.readouterr().err


def test_out_is_a_file_or_a_folder(tmp_path: Path) -> None:
    mix = {"id": "5f2a9c0e7b1d4a6c8e3f0a2b", "file": {"format": "flac"}}
    assert destination(None, "J", mix) == Path("J-mix-5f2a9c0e.flac")
    assert destination(str(tmp_path / "mixes") + "/", "J", mix) == tmp_path / "mixes" / "J-mix-5f2a9c0e.flac"
    assert destination(str(tmp_path / "folder"), "J", mix) == tmp_path / "folder" / "J-mix-5f2a9c0e.flac"
    assert destination(str(tmp_path / "out" / "take.flac"), "J", mix) == tmp_path / "out" / "take.flac"
    assert (tmp_path / "out").is_dir()
