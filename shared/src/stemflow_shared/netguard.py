"""Outbound HTTP to user-supplied URLs (source_url, callback_url) without SSRF.

Only http and https; the host is resolved once, every address it resolves to
must be public, and the connection goes to that checked address (Host header
and TLS SNI keep the name), so a DNS answer that changes between the check and
the connection (rebinding) cannot redirect the request. Redirects are followed
by hand, each target checked the same way.

A host name that does not resolve, or that resolves to an address that is
refused, gets one and the same answer (`url_forbidden`, "<host> does not
resolve to a public address"): different answers would tell anyone who can
submit a URL which internal names exist. Only a temporary DNS failure differs
(`fetch_failed`, worth retrying), and the real reason is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

log = logging.getLogger(__name__)

# Cloud metadata services: refused even where private addresses are allowed (a dev or test setting).
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


class UrlRefused(Exception):
    """The URL may not be fetched; `code` is `url_forbidden` or `fetch_failed`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Target:
    """A URL rewritten to the checked address, and how to present the original name."""

    url: str
    host_header: str
    sni_hostname: str | None


def _unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    address = _unmapped(address)
    return address.is_global and not address.is_multicast


async def resolve(url: str, *, allow_private: bool = False) -> Target:
    """Check a URL and pin it to one of its (all public) addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlRefused("url_forbidden", "only http and https URLs are allowed")
    if parts.username or parts.password:
        raise UrlRefused("url_forbidden", "URLs with credentials are not allowed")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = await _resolve_name(host, port, allow_private)
    else:
        if _unmapped(addresses[0]) in _METADATA:
            raise UrlRefused("url_forbidden", f"{host} is a cloud metadata address")
        if not allow_private and not _allowed(addresses[0]):
            raise UrlRefused("url_forbidden", f"{host} is not a public address")
    chosen = addresses[0]
    ip_host = f"[{chosen}]" if chosen.version == 6 else str(chosen)
    netloc = f"{ip_host}:{parts.port}" if parts.port else ip_host
    host_header = f"{host}:{parts.port}" if parts.port else host
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    return Target(pinned, host_header, host if parts.scheme == "https" else None)


async def _resolve_name(
    host: str, port: int, allow_private: bool
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses of a name, all of them allowed; one answer for every refusal (see the module's doc)."""
    refused = UrlRefused("url_forbidden", f"{host} does not resolve to a public address")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise UrlRefused("fetch_failed", f"temporary failure resolving {host}; retry later") from exc
        log.info("refused %s: %s", host, exc)
        raise refused from None
    except UnicodeError:
        log.info("refused %s: not a valid name", host)
        raise refused from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    bad = [a for a in addresses if _unmapped(a) in _METADATA or not (allow_private or _allowed(a))]
    if not addresses or bad:
        log.info("refused %s: resolves to %s", host, ", ".join(map(str, bad)) or "nothing")
        raise refused
    return addresses


@contextlib.asynccontextmanager
async def guarded_request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    allow_private: bool = False,
    max_redirects: int = 3,
    follow_redirects: bool = True,
    **kwargs: Any,
) -> AsyncIterator[httpx.Response]:
    """A streamed request to a user-supplied URL; redirects are re-checked hop by hop.

    With `follow_redirects=False` the first answer is the response, a 3xx included.
    """
    for _ in range(max_redirects + 1):
        target = await resolve(url, allow_private=allow_private)
        headers = {**kwargs.pop("headers", {}), "Host": target.host_header}
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
        request = client.build_request(method, target.url, headers=headers, extensions=extensions, **kwargs)
        response = await client.send(request, stream=True, follow_redirects=False)
        if follow_redirects and response.is_redirect and "location" in response.headers:
            await response.aclose()
            url = urljoin(url, response.headers["location"])
            kwargs["headers"] = {k: v for k, v in headers.items() if k != "Host"}
            continue
        try:
            yield response
        finally:
            await response.aclose()
        return
    raise UrlRefused("fetch_failed", f"more than {max_redirects} redirects")
