"""The SSRF guard tells nobody which internal names exist: every refused name gets the same answer."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import pytest_asyncio

from stemflow_shared.netguard import UrlRefused, resolve

ANSWERS: dict[str, Any] = {
    "missing.example": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    "internal.example": ["10.1.2.3"],
    "loopback.example": ["127.0.0.1"],
    "metadata.example": ["169.254.169.254"],
    "mixed.example": ["93.184.215.14", "192.168.0.9"],
    "flaky.example": socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
    "public.example": ["93.184.215.14"],
}


@pytest_asyncio.fixture
async def dns(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        answer = ANSWERS[host]
        if isinstance(answer, Exception):
            raise answer
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in answer]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)


async def refusal(url: str, **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(UrlRefused) as info:
        await resolve(url, **kwargs)
    return info.value.code, str(info.value)


@pytest.mark.usefixtures("dns")
async def test_a_name_that_does_not_resolve_and_one_that_resolves_inside_answer_alike() -> None:
    answers = {
        host: (await refusal(f"https://{host}/song.mp3"))
        for host in ("missing.example", "internal.example", "loopback.example", "metadata.example", "mixed.example")
    }
    assert {(code, message.replace(host, "HOST")) for host, (code, message) in answers.items()} == {
        ("url_forbidden", "HOST does not resolve to a public address")
    }
    # Where private addresses are allowed (dev, tests), a missing name and a metadata address still answer alike.
    allowed = {
        host: await refusal(f"http://{host}/x", allow_private=True) for host in ("missing.example", "metadata.example")
    }
    assert len({message.replace(host, "HOST") for host, (_, message) in allowed.items()}) == 1


@pytest.mark.usefixtures("dns")
async def test_a_temporary_dns_failure_is_worth_retrying_and_a_public_name_is_pinned() -> None:
    assert (await refusal("https://flaky.example/x"))[0] == "fetch_failed"
    target = await resolve("https://public.example:8443/a")
    assert target.url == "https://93.184.215.14:8443/a" and target.host_header == "public.example:8443"
