"""The command line: arguments, job options, exit codes of problems found before any request."""

from __future__ import annotations

from pathlib import Path

import pytest

from stemflow_cli.main import _options, build_parser, run


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(list(argv))


def test_only_the_options_given_are_sent_so_the_server_defaults_apply() -> None:
    args = parse("submit", "a.wav", "--stems", "2", "--format", "flac", "--trim", "10:95", "--no-analyze")
    assert _options(args) == {
        "stems": 2,
        "output_format": "flac",
        "trim_start": 10.0,
        "trim_end": 95.0,
        "analyze": False,
    }
    assert _options(parse("submit", "a.wav")) == {}


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
    assert options == {"targets": ["htdemucs:4", "htdemucs_6s:6"]}
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
    }
