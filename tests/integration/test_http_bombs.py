"""Oversized requests against the running gateway: refused early, and the gateway keeps serving."""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = pytest.mark.integration


def raw_request(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes as they are (no client library would send these) and read what comes back."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as conn:
        try:
            conn.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may hang up before reading everything: that is a refusal too
        chunks = []
        try:
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int | None:
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else None


def still_serving(system: Any) -> None:
    assert httpx.get(f"{system.gateway_url}/healthz", timeout=10).status_code == 200


def test_a_header_bomb_is_refused(system: Any, api_key: str) -> None:
    bomb = b"X-Filler: " + b"a" * 1_000_000 + b"\r\n"
    head = b"GET /v1/jobs HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + api_key.encode() + b"\r\n" + bomb + b"\r\n"
    answer = raw_request(system.gateway_url, head)
    assert status_of(answer) == 431 and b'"code": "headers_too_large"' in answer, answer[:300]
    assert answer.count(b"HTTP/1.1") == 1  # one answer, and nothing of the request reached the application
    still_serving(system)


def test_too_many_headers_are_refused(system: Any, api_key: str) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(1_000))  # 10 KB: under the byte limit, over the count
    head = b"GET /v1/jobs HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + api_key.encode() + b"\r\n" + many + b"\r\n"
    answer = raw_request(system.gateway_url, head)
    assert status_of(answer) == 431 and b'"code": "headers_too_large"' in answer, answer[:300]
    assert answer.count(b"HTTP/1.1") == 1
    still_serving(system)


def test_a_declared_length_beyond_the_limit_is_refused_before_the_body(system: Any, api_key: str) -> None:
    head = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + api_key.encode() + b"\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 99999999999\r\n\r\n"
    )
    answer = raw_request(system.gateway_url, head, b"--xyz\r\n")
    assert status_of(answer) == 413, answer[:300]
    assert b"payload_too_large" in answer
    still_serving(system)


def test_a_json_body_bomb_is_refused(system: Any, api_key: str) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    answer = httpx.post(
        f"{system.gateway_url}/v1/jobs",
        content=nested,
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 413 and answer.json()["code"] == "payload_too_large"
    still_serving(system)


def test_the_notifier_refuses_a_header_bomb_too(system: Any, api_key: str) -> None:
    notifier = system.events_url.replace("ws://", "http://").removesuffix("/v1/ws")
    head = (
        b"GET /v1/ws HTTP/1.1\r\nHost: n\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Authorization: Bearer " + api_key.encode() + b"\r\nX-Filler: " + b"a" * 200_000 + b"\r\n\r\n"
    )
    answer = raw_request(notifier, head)
    assert status_of(answer) == 431, answer[:300]
    assert httpx.get(f"{notifier}/healthz", timeout=10).status_code == 200
