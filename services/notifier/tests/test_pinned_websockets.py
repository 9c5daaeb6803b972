"""websockets is pinned because notifier.protocol subclasses uvicorn's sans-I/O protocol and websockets' own."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import websockets.protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.server import ServerProtocol

from notifier import protocol

CONSTRAINTS = Path(__file__).resolve().parents[3] / "constraints.txt"


def test_websockets_is_the_pinned_version() -> None:
    found = re.search(r"^websockets==(\S+)$", CONSTRAINTS.read_text(), re.M)
    assert found and version("websockets") == found.group(1), "websockets changed: re-check notifier.protocol"


def test_what_the_notifier_overrides_and_reads_is_still_there() -> None:
    assert list(inspect.signature(ServerProtocol.send_frame).parameters)[1:] == ["frame"]
    assert re.search(r"self\.writes\b.*=", inspect.getsource(websockets.protocol.Protocol)), "writes is still a list"
    assert list(inspect.signature(WebSocketsSansIOProtocol.send).parameters)[1:] == ["message"]
    theirs = inspect.getsource(WebSocketsSansIOProtocol)
    for name in ("conn", "config", "writable", "transport"):
        assert f"self.{name} =" in theirs, f"uvicorn's WebSocketsSansIOProtocol no longer sets self.{name}"
    assert "send_frame" in vars(protocol.CountingServerProtocol)
