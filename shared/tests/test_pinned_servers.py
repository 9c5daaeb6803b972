"""uvicorn and httptools are pinned because stemflow_shared.httpserver subclasses their protocol's internals.

An upgrade must fail here loudly, not in production quietly: the versions must be the pinned ones, and every
method the subclass overrides or calls, and every attribute it reads, must still be there.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from stemflow_shared import httpserver

CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"


def pinned(package: str) -> str:
    found = re.search(rf"^{re.escape(package)}==(\S+)$", CONSTRAINTS.read_text(), re.M)
    assert found, f"{package} is pinned in constraints.txt"
    return found.group(1)


@pytest.mark.parametrize("package", ["uvicorn", "httptools"])
def test_the_installed_servers_are_the_pinned_ones(package: str) -> None:
    assert version(package) == pinned(package), f"{package} changed: re-check stemflow_shared.httpserver, then re-pin"


OVERRIDDEN = {
    "connection_made": ["transport"],
    "connection_lost": ["exc"],
    "data_received": ["data"],
    "handle_websocket_upgrade": [],
    "on_response_complete": [],
    "on_message_begin": [],
    "on_header": ["name", "value"],
    "on_headers_complete": [],
    "on_body": ["body"],
    "on_message_complete": [],
    "send_400_response": ["msg"],
}


@pytest.mark.parametrize(("method", "parameters"), OVERRIDDEN.items())
def test_every_overridden_method_still_exists_with_its_parameters(method: str, parameters: list[str]) -> None:
    base = getattr(HttpToolsProtocol, method)
    assert list(inspect.signature(base).parameters)[1:] == parameters
    assert method in vars(httpserver.LimitedHttpToolsProtocol), "the subclass overrides it"


def test_every_attribute_the_subclass_reads_is_set_by_uvicorn() -> None:
    ours = inspect.getsource(httpserver)
    theirs = inspect.getsource(HttpToolsProtocol)
    read = set(re.findall(r"self\.(parser|transport|flow|cycle|server_state|timeout_keep_alive_task)\b", ours))
    assert read, "the subclass reads uvicorn's protocol state"
    for name in read:
        assert f"self.{name} =" in theirs, f"uvicorn's HttpToolsProtocol no longer sets self.{name}"
