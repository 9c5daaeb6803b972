"""Where the API is and which key to use: flags, then environment, then the config file."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .errors import CliError, Exit

DEFAULT_URL = "http://127.0.0.1:8000"
ENV = {"url": "STEMFLOW_URL", "events_url": "STEMFLOW_EVENTS_URL", "api_key": "STEMFLOW_API_KEY"}
KEYS = tuple(ENV)


@dataclass(frozen=True)
class Config:
    url: str
    events_url: str | None
    api_key: str | None
    path: Path

    def require_key(self) -> str:
        if not self.api_key:
            raise CliError(
                "no API key is configured",
                Exit.USAGE,
                hint=f"set STEMFLOW_API_KEY, pass --api-key, or run `stemflow configure` (writes {self.path})",
            )
        return self.api_key


def default_path(environ: Mapping[str, str]) -> Path:
    if environ.get("STEMFLOW_CONFIG"):
        return Path(environ["STEMFLOW_CONFIG"]).expanduser()
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")) / ".config")
    return Path(base).expanduser() / "stemflow" / "config.toml"


def read_file(path: Path) -> dict[str, str]:
    """The config file's settings; a missing file is empty, a broken one an error."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"cannot read the config file {path}: {exc}", Exit.USAGE) from exc
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise CliError(
            f"unknown setting {', '.join(unknown)} in {path}", Exit.USAGE, hint=f"known settings: {', '.join(KEYS)}"
        )
    for key, value in data.items():
        if not isinstance(value, str):
            raise CliError(f"{key} in {path} must be a string", Exit.USAGE)
    return data


def load(flags: Mapping[str, str | None], environ: Mapping[str, str], path: Path | None = None) -> Config:
    """Each setting from the first of: a flag, the environment, the config file."""
    path = path or default_path(environ)
    from_file = read_file(path)
    values: dict[str, str | None] = {}
    for key in KEYS:
        values[key] = flags.get(key) or environ.get(ENV[key]) or from_file.get(key) or None
    url = _check_url(values["url"] or DEFAULT_URL, ("http", "https"), "url")
    events = _check_url(values["events_url"], ("ws", "wss"), "events_url") if values["events_url"] else None
    return Config(url=url.rstrip("/"), events_url=events, api_key=values["api_key"], path=path)


def _check_url(url: str, schemes: tuple[str, ...], name: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.netloc:
        raise CliError(f"{name} must be a {' or '.join(schemes)} URL, not {url!r}", Exit.USAGE)
    return url


def events_base(url: str) -> str:
    """A WebSocket URL without its query (job documents' `links.events` carry `?job_id=`)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def write(path: Path, settings: Mapping[str, str]) -> None:
    """Merge `settings` into the config file, readable by its owner only (it holds the key)."""
    current = read_file(path)
    current.update({k: v for k, v in settings.items() if v})
    path.parent.mkdir(parents=True, exist_ok=True)
    # JSON strings are valid TOML basic strings.
    text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in sorted(current.items()))
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
