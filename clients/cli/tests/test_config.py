"""Configuration: flags over environment over the config file, and clear errors for bad settings."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from stemflow_cli import config
from stemflow_cli.errors import CliError, Exit


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_each_setting_comes_from_the_flag_then_the_environment_then_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "config.toml",
        'url = "http://file:1"\nevents_url = "ws://file:2/v1/ws"\napi_key = "from-file"\n',
    )
    environ = {"STEMFLOW_URL": "http://env:1", "STEMFLOW_API_KEY": "from-env"}
    loaded = config.load({"api_key": "from-flag", "url": None}, environ, path)
    assert loaded.api_key == "from-flag"
    assert loaded.url == "http://env:1"
    assert loaded.events_url == "ws://file:2/v1/ws"


def test_without_any_setting_the_local_gateway_is_used_and_a_key_is_required(tmp_path: Path) -> None:
    loaded = config.load({}, {}, tmp_path / "missing.toml")
    assert loaded.url == config.DEFAULT_URL and loaded.events_url is None
    with pytest.raises(CliError) as raised:
        loaded.require_key()
    assert raised.value.exit_code == Exit.USAGE
    assert "STEMFLOW_API_KEY" in raised.value.hint


def test_the_config_file_is_found_through_stemflow_config_or_xdg(tmp_path: Path) -> None:
    assert config.default_path({"STEMFLOW_CONFIG": str(tmp_path / "c.toml")}) == tmp_path / "c.toml"
    assert config.default_path({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "stemflow" / "config.toml"
    assert config.default_path({"HOME": str(tmp_path)}) == tmp_path / ".config" / "stemflow" / "config.toml"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("url = ", "cannot read the config file"),
        ('colour = "blue"\n', "unknown setting colour"),
        ("api_key = 42\n", "api_key in"),
        ('url = "ftp://x"\n', "url must be a http or https URL"),
        ('events_url = "http://x/v1/ws"\n', "events_url must be a ws or wss URL"),
    ],
)
def test_a_bad_config_file_is_a_usage_error_that_names_the_problem(tmp_path: Path, text: str, says: str) -> None:
    path = write(tmp_path / "config.toml", text)
    with pytest.raises(CliError) as raised:
        config.load({}, {}, path)
    assert raised.value.exit_code == Exit.USAGE
    assert says in raised.value.message


def test_write_merges_into_a_file_only_its_owner_can_read(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config.toml"
    config.write(path, {"url": "http://a:1"})
    config.write(path, {"api_key": 'sfk_"quoted"\\key'})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.read_file(path) == {"url": "http://a:1", "api_key": 'sfk_"quoted"\\key'}


def test_events_links_lose_their_query() -> None:
    assert config.events_base("ws://h:8001/v1/ws?job_id=abc") == "ws://h:8001/v1/ws"
