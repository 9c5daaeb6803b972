"""source_url fetching against a real local HTTP server: limits, redirects and the SSRF guard."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from ingest.fetch import FetchError, fetch
from stemflow_shared.netguard import UrlRefused, resolve

BODY = b"x" * 5000


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        routes = {
            "/song": (200, {}, BODY),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/hop": (302, {"Location": "/song"}, b""),
            "/outside": (302, {"Location": "http://169.254.169.254/latest/meta-data"}, b""),
            "/missing": (404, {}, b""),
        }
        status, headers, body = routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


async def get(url: str, dst: Path, *, allow_private: bool = True, max_bytes: int = 10_000) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        return await fetch(url, dst, client=client, max_bytes=max_bytes, max_redirects=2, allow_private=allow_private)


async def test_fetches_and_follows_checked_redirects(server: str, tmp_path: Path) -> None:
    assert await get(f"{server}/hop", tmp_path / "a") == len(BODY)
    assert (tmp_path / "a").read_bytes() == BODY


@pytest.mark.parametrize(
    ("path", "kwargs", "code"),
    [
        ("/song", {"allow_private": False}, "url_forbidden"),
        ("/song", {"max_bytes": 100}, "too_large"),
        ("/loop", {}, "fetch_failed"),
        ("/missing", {}, "fetch_failed"),
    ],
)
async def test_refusals_have_codes(server: str, tmp_path: Path, path: str, kwargs: dict, code: str) -> None:
    with pytest.raises(FetchError) as info:
        await get(server + path, tmp_path / "b", **kwargs)
    assert info.value.code == code


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://localhost/x",
        "http://10.0.0.1/x",
        "http://192.168.1.1/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://0.0.0.0/x",
        "ftp://example.com/x",
        "file:///etc/passwd",
        "http://user:pw@example.com/x",
    ],
)
async def test_the_guard_refuses_non_public_targets(url: str) -> None:
    with pytest.raises(UrlRefused):
        await resolve(url)


async def test_a_redirect_to_a_metadata_address_is_refused_even_where_private_addresses_are_allowed(
    server: str, tmp_path: Path
) -> None:
    # The first hop is loopback (allowed in this test); the redirect target is checked on its own.
    with pytest.raises(FetchError) as info:
        await asyncio.wait_for(get(f"{server}/outside", tmp_path / "c", allow_private=True), 10)
    assert info.value.code == "url_forbidden"
    assert not (tmp_path / "c").exists()


async def test_pinned_target_keeps_the_name_for_host_and_sni() -> None:
    target = await resolve("https://93.184.215.14:8443/a?b=1")
    assert target.url == "https://93.184.215.14:8443/a?b=1"
    assert target.host_header == "93.184.215.14:8443"
